"""benchmarks/run.py rewrites BENCHMARKS.md but keeps the sections other benchmark scripts own."""

import importlib.util

from tests.train_helpers import REPO


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_other_scripts_sections_survive_a_rewrite(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    predict = "<!-- benchmarks/predict.py: begin -->\n## Crowd\n| a | b |\n<!-- benchmarks/predict.py: end -->"
    other = "<!-- benchmarks/x-y.py: begin -->\nx\n<!-- benchmarks/x-y.py: end -->"
    path.write_text(f"# old report\nold figures\n\n{predict}\n\nstray text\n{other}\n")
    kept = _run_module().kept_sections(str(path))
    assert kept == f"\n{predict}\n\n{other}\n"
    assert "old figures" not in kept and "stray text" not in kept
    assert _run_module().kept_sections(str(tmp_path / "missing.md")) == ""
