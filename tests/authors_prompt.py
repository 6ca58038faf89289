"""The authors' prompt, as an independent reference for the tests (never imported by the package).

The three format strings are copied character for character from
dataset_construction/organize_alphca_dataset.py (Znull-1220/SocialAlign @9766c3c) and applied
exactly as the authors apply them: .format(...).strip(). Nothing here is built from
socialalign_jax.data.prompt.
"""

import re

AUTHORS_FULL = f"""
你的用户名为{{user_name}}, 以下是你的五条历史博文: 
1. {{history_1}}
2. {{history_2}}
3. {{history_3}}
4. {{history_4}}
5. {{history_5}}
以下是你的用户画像：
{{user_persona}}
现在你看到了一则新闻: 
{{news}}
关于这个新闻的hashtag #{{topic}}# 登上了微博热搜，请发一条关于hashtag #{{topic}}# 的微博，请注意：
    - 可以参考你的个人信息、历史博文、用户画像和这则新闻，用自己的风格和立场发表观点
    - 这条微博的长度应与你的历史博文相似
    - 不要强行参考历史信息
    - 仅输出你发表的微博内容
"""

AUTHORS_WITHOUT_PERSONA = f"""
你的用户名为{{user_name}}, 以下是你的五条历史博文: 
1. {{history_1}}
2. {{history_2}}
3. {{history_3}}
4. {{history_4}}
5. {{history_5}}
现在你看到了一则新闻: 
{{news}}
关于这个新闻的hashtag #{{topic}}# 登上了微博热搜，请发一条关于hashtag #{{topic}}# 的微博，请注意：
    - 可以参考你的个人信息、历史博文和这则新闻，用自己的风格和立场发表观点
    - 这条微博的长度应与你的历史博文相似
    - 不要强行参考历史信息
    - 仅输出你发表的微博内容
"""

AUTHORS_WITHOUT_HISTORY = f"""
你的用户名为{{user_name}}, 以下是你的用户画像：
{{user_persona}}
现在你看到了一则新闻: 
{{news}}
关于这个新闻的hashtag #{{topic}}# 登上了微博热搜，请发一条关于hashtag #{{topic}}# 的微博，请注意：
    - 可以参考你的个人信息、用户画像和这则新闻，用自己的风格和立场发表观点
    - 这条微博的长度应与你的历史博文相似
    - 不要强行参考历史信息
    - 仅输出你发表的微博内容
"""

AUTHORS_TEMPLATES = {"full": AUTHORS_FULL, "without_persona": AUTHORS_WITHOUT_PERSONA,
                     "without_history": AUTHORS_WITHOUT_HISTORY}


def authors_history_item(item: dict) -> str:
    """The authors' format_history_item: the original post, or the retweet sentence, stripped."""
    if item.get("retweet"):
        return "\n    你转发了微博: {retweet_text}, 并评论说: {text}\n    ".format(
            retweet_text=item["retweet"]["text"], text=item["text"]).strip()
    return "\n    {text}\n    ".format(text=item["text"]).strip()


def authors_instruction(raw_case: dict, topic: str, news: str, mode: str) -> str:
    """The authors' organize_dataset loop body for one case (their cleaning of news and persona)."""
    news = news.replace("\\n", "\n")
    persona = re.sub(r"\n{2,}", "\n", raw_case.get("user_persona", ""))
    history = {f"history_{i + 1}": authors_history_item(h) for i, h in enumerate(raw_case["history"][:5])}
    return AUTHORS_TEMPLATES[mode].format(user_name=raw_case["user_name"], user_persona=persona, news=news,
                                          topic=topic, **history).strip()


def authors_chat(instruction: str, weibo: str | None = None) -> str:
    """ChatML as Qwen's chat template renders the authors' SFT records (system, user, assistant)."""
    out = f"<|im_start|>system\n你是一个微博用户。<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    return out if weibo is None else out + weibo + "<|im_end|>"
