"""A seeded synthetic Weibo sample whose sentiment depends on both the event and the user.

Real SocialAlign data cannot be redistributed, yet tests and the quick-start need events
in the raw format with signal a tiny model can pick up. The generative story:

* each user has a latent disposition d_u (pessimist / neutral / optimist); it shows in
  the persona's wording and in the tone of the user's history posts;
* each event has a base polarity b_e and its own vocabulary (news, hashtag, keywords);
* a response's label is drawn from softmax(SCALE * [-(b_e + d_u), 0, b_e + d_u])
  (negative, neutral, positive), so event distributions differ between events and,
  within an event, users' labels follow their dispositions;
* the response text joins a label-specific phrase with an event keyword.

``random.Random`` with a fixed seed and sorted JSON output make the files byte-identical
for a given seed and generator version.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from socialalign_jax.core.labels import DEFAULT_LABELS

SAMPLE_DIR = Path(__file__).parent / "sample"
DEFAULT_SEED = 20250701
SCALE = 1.6

# (topic, news, keywords, base polarity)
EVENTS = [
    ("高考放榜", "今年高考成绩今日公布，多地考生查分系统一度拥堵。", ["高考", "查分", "考生"], 0.6),
    ("地铁故障", "早高峰地铁二号线突发信号故障，列车停运近一小时。", ["地铁", "停运", "早高峰"], -1.4),
    ("大熊猫出生", "动物园迎来一对双胞胎大熊猫宝宝，母子平安。", ["熊猫", "宝宝", "动物园"], 1.8),
    ("食品安全", "某连锁餐厅被曝使用过期食材，监管部门已介入调查。", ["餐厅", "过期", "监管"], -2.0),
    ("新能源汽车", "新能源汽车购置补贴政策延续至明年年底。", ["补贴", "新能源", "汽车"], 0.3),
    ("暴雨预警", "气象台发布暴雨红色预警，部分学校宣布停课。", ["暴雨", "停课", "预警"], -0.8),
    ("航天发射", "新一代运载火箭首飞成功，卫星顺利进入预定轨道。", ["火箭", "卫星", "发射"], 2.0),
    ("房价调控", "多个城市出台楼市新政，首付比例下调。", ["楼市", "首付", "房价"], 0.0),
    ("明星离婚", "某知名演员夫妇宣布离婚，双方发表声明。", ["演员", "离婚", "声明"], -0.4),
    ("延迟退休", "有关部门就渐进式延迟退休方案公开征求意见。", ["退休", "方案", "养老"], -1.0),
    ("国足比赛", "国足客场一比一战平对手，保留出线希望。", ["国足", "比赛", "出线"], 0.2),
    ("景区门票", "多家景区宣布节假日门票免费，游客数量激增。", ["景区", "门票", "游客"], 1.0),
]

DISPOSITIONS = {  # d_u, persona fragments, history tone fragments
    "pessimist": (-1.2, ["爱吐槽", "看什么都不顺眼", "对社会新闻很敏感", "经常抱怨生活"],
                  ["又是糟糕的一天", "真是受够了", "什么都不顺利", "心情很差", "太让人失望了", "烦死了"]),
    "neutral": (0.0, ["理性冷静", "喜欢看数据说话", "不轻易下结论", "习惯客观分析"],
                ["记录一下今天", "先看看再说", "数据还需要核实", "保持观望", "等官方消息", "就事论事"]),
    "optimist": (1.2, ["乐观开朗", "热爱生活", "喜欢给别人点赞", "相信明天会更好"],
                 ["今天阳光真好", "生活真美好", "感恩遇见", "开心的一天", "加油加油", "一切都会好起来"]),
}
OCCUPATIONS = ["大学生", "程序员", "护士", "教师", "自由职业者", "退休职工", "外卖骑手", "设计师", "会计", "记者"]
HOBBIES = ["追剧", "跑步", "摄影", "做饭", "旅行", "看球", "养猫", "读书", "打游戏", "钓鱼"]
DAILY = ["早餐吃了包子", "下班路上堵车", "周末去公园散步", "晚上看了一部电影", "今天加班到很晚", "和朋友去吃火锅"]
NAME_A = ["小", "阿", "老", "大", "萌", "甜", "酷", "暖"]
NAME_B = ["鱼", "猫", "橙", "风", "星", "云", "米", "豆", "竹", "月", "雪", "松"]
IPS = ["北京", "上海", "广东", "四川", "浙江", "江苏", "湖北", "山东", "河南", "陕西"]
PHRASES = {
    "negative": ["太离谱了", "真让人生气", "无语了", "这也太糟糕了", "必须严查", "失望透顶"],
    "neutral": ["关注一下", "等后续消息", "理性看待", "先不评价", "静观其变", "看看再说"],
    "positive": ["太棒了", "点赞", "真为他们高兴", "好消息", "支持", "开心"],
}
OPENERS = ["说实话", "看到", "关于", "刚刷到", "听说", ""]


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _make_users(rng: random.Random, n: int) -> list[dict]:
    users, names = [], set()
    kinds = list(DISPOSITIONS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d, persona_words, tone = DISPOSITIONS[kind]
        name = ""
        while not name or name in names:
            name = rng.choice(NAME_A) + rng.choice(NAME_B) + str(rng.randint(10, 999))
        names.add(name)
        persona = f"{rng.choice(OCCUPATIONS)}，{'，'.join(rng.sample(persona_words, 2))}，平时喜欢{rng.choice(HOBBIES)}"
        history = []
        for t in rng.sample(tone, 3):
            history.append({"text": f"{t}，{rng.choice(DAILY)}"})
        topical = rng.sample(EVENTS, 2)
        for topic, _, kws, _ in topical:
            history.append({"text": f"{rng.choice(kws)}的事{rng.choice(tone)}", "topics": [topic]})
        other = rng.choice(EVENTS)
        history.append({"text": rng.choice(tone), "retweet": {"text": other[1][:14]}})
        history.append({"text": f"#{rng.choice(EVENTS)[0]}#"})  # hashtag-only: BM25 drops it
        history.append({"text": f"{rng.choice(DAILY)}，{rng.choice(HOBBIES)}时间"})
        rng.shuffle(history)
        users.append(dict(name=name, d=d + rng.uniform(-0.3, 0.3), persona=persona, history=history,
                          level=str(rng.randint(1, 40)), gender=rng.choice(["m", "f"]), ip=rng.choice(IPS)))
    return users


def generate_events(seed: int = DEFAULT_SEED, num_events: int = 12, users_per_event: int = 40,
                    num_users: int = 96) -> list[dict]:
    """The sample as raw-format event dicts (SPEC section 4), one per event."""
    if num_events > len(EVENTS) or users_per_event > num_users:
        raise ValueError(f"at most {len(EVENTS)} events and users_per_event <= num_users")
    rng = random.Random(seed)
    users = _make_users(rng, num_users)
    events = []
    for topic, news, kws, base in EVENTS[:num_events]:
        cases = []
        for u in rng.sample(users, users_per_event):
            z = base + u["d"]
            label = rng.choices(DEFAULT_LABELS, weights=_softmax([-SCALE * z, 0.0, SCALE * z]))[0]
            weibo = f"{rng.choice(OPENERS)}{rng.choice(kws)}这事，{rng.choice(PHRASES[label])}！#{topic}#"
            cases.append({"user_name": u["name"], "weibo": weibo, "history": u["history"],
                          "user_persona": u["persona"], "sentiment": label,
                          "user_level": u["level"], "gender": u["gender"], "ip": u["ip"]})
        events.append({"topic": topic, "news": news, "cases": cases})
    return events


README = """# Synthetic sample (not real Weibo data)

Generated by `scripts/make_sample.py` (seed {seed}) from `socialalign_jax/data/sample.py`.
Every name, post, persona and label is synthetic. Labels follow
softmax({scale} * [-(b_e + d_u), 0, b_e + d_u]) over (negative, neutral, positive), with
b_e an event polarity and d_u a user disposition visible in the persona and history, so
both per-user and per-event sentiment are learnable. Use it for tests and smoke runs only.
"""


def write_sample(out_dir: str | Path = SAMPLE_DIR, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write ``events/event_XX.json`` and ``README.md``; returns the event file paths."""
    out_dir = Path(out_dir)
    (out_dir / "events").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ev in enumerate(generate_events(seed)):
        p = out_dir / "events" / f"event_{i:02d}.json"
        p.write_text(json.dumps(ev, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        paths.append(p)
    (out_dir / "README.md").write_text(README.format(seed=seed, scale=SCALE), encoding="utf-8")
    return paths


def load_sample_dir() -> Path:
    """Directory of the bundled sample's event files (pass it to ``read_event_dir``)."""
    return SAMPLE_DIR / "events"
