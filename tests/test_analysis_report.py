"""The output and inputs every `hub-sae analyze` command shares."""

import json

import matplotlib
import pytest

from hub_sae.analysis.report import Report, read_prompts, write_report

matplotlib.use("Agg")


def _report() -> Report:
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    return Report("demo", {"x": [1.0, float("nan")], "y": float("inf")}, "| a |\n|---|\n", figure)


def test_report_writes_json_png_and_table_into_a_new_folder(tmp_path):
    out = write_report(_report(), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.md", "demo.png"]
    assert json.loads((out / "demo.json").read_text()) == {"x": [1.0, None], "y": None}
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="not empty"):
        write_report(_report(), out)
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.md", "demo.png"]


def test_prompts_from_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  \nsecond one\n")
    assert read_prompts(text) == ["first prompt", "second one"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert read_prompts(rows) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("empty.txt", "\n\n", "holds no prompt"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": null}\n', r"bad.jsonl:2 needs a \"prompt\""),
        ("broken.jsonl", "{nope\n", r"broken.jsonl:1 is not JSON"),
        ("binary.txt", b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_bad_prompts_files_are_named(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=error):
        read_prompts(path)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "nope.txt")
