"""evaluate.py's pages (page.py): the self-contained before/after page, the blind study's pairs, its results file,
win rate and agreement, and their one-line refusals. The click-through in a real browser: test_study_browser.py."""
import base64
import json
import os
import re

import pytest
import torch

import agreement
import evaluate
import page
from inputs import UserError
from videos import write_video

PROMPTS = ["a red circle moves left", "a blue bar moves up"]


def make_run(folder, level: int, n: int = 2):
    """Videos {prompt}-{i}.mp4; `level` of flicker noise (the 'before' run flickers more)."""
    g = torch.Generator().manual_seed(level)
    os.makedirs(folder, exist_ok=True)
    for prompt in PROMPTS:
        for i in range(n):
            v = torch.full((6, 16, 16, 3), 100, dtype=torch.int32) + torch.randint(0, level + 1, (6, 16, 16, 3),
                                                                                      generator=g)
            write_video(os.path.join(folder, f"{prompt}-{i}.mp4"), v.clamp(0, 255).to(torch.uint8), fps=8)
    out = os.path.join(folder, "evaluation.json")
    evaluate.main([str(folder), "--metrics", "temporal_flickering", "--out", out, "--name", os.path.basename(folder)])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "before", 120), make_run(root / "after", 10)


def test_comparison_page_inlines_every_video_with_the_table_and_the_reward_curve(runs, tmp_path):
    run = tmp_path / "train"
    os.makedirs(run)
    rows = [{"step": s, "reward_mean": 0.5 + s / 10, "reward_w": 0.6 + s / 10, "reward_l": 0.4, "ref_updates": s // 2,
             "reward_dim": "temporal_consistency"} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "args.json").write_text(json.dumps({"k": 2}))
    evaluate.main(["--compare", *runs, "--html", str(tmp_path / "page.html"), "--run", str(run)])
    text = (tmp_path / "page.html").read_text()
    uris = re.findall(r'<video src="data:video/mp4;base64,([^"]+)"', text)
    assert len(uris) == 2 * len(PROMPTS) * 2  # every video of both runs
    first = os.path.join(os.path.dirname(runs[0]), f"{sorted(PROMPTS)[0]}-0.mp4")  # prompts in file order
    assert base64.b64decode(uris[0]) == open(first, "rb").read()  # the file itself, before then after
    assert all(f"<h3>{p}</h3>" in text for p in PROMPTS) and "<td>Temporal Flickering</td>" in text and "<th>after</th>" in text
    assert "<polyline" in text and "ref-update" in text  # the reward curve with its reference updates
    assert not re.search(r'(src|href)="(https?:)?//', text)  # self-contained: nothing fetched


def test_study_pairs_are_blind_seeded_and_hold_one_video_of_each_run(runs):
    a, b = (json.load(open(r)) for r in runs)
    study, pairs = page.study_pairs(a, b, seed=3)
    assert len(pairs) == 4 and page.study_pairs(a, b, seed=3) == (study, pairs)
    assert page.study_pairs(a, b, seed=4)[0] != study  # another seed is another study
    for p in pairs:
        assert sorted(p["runs"]) == ["after", "before"]
        assert os.path.basename(p["videos"][0]) == os.path.basename(p["videos"][1])
        assert f"{p['prompt']}-" in os.path.basename(p["videos"][0])
    sides = {p["runs"][0] for p in page.study_pairs(a, b, seed=0)[1] + pairs}
    assert sides == {"after", "before"}  # either run can be on the left


def judged(study_id: str, choices: list[tuple[str, str]]) -> dict:
    """A results file as the page saves it: (run on the left, choice) per pair."""
    runs = ["before", "after"]
    return {"study": study_id, "runs": runs, "judgements": [
        {"pair": i, "prompt": "p", "videos": ["/x/l.mp4", "/x/r.mp4"], "runs": [left, ({*runs} - {left}).pop()],
         "choice": c} for i, (left, c) in enumerate(choices)]}


def test_win_rate_counts_ties_half_with_a_bootstrap_interval(tmp_path, capsys):
    choices = [("after", "left"), ("before", "right"), ("after", "left"), ("after", "tie"), ("before", "left"),
               ("after", "right")]  # 'after' wins 3, ties 1, loses 2
    (tmp_path / "r1.json").write_text(json.dumps(judged("s1", choices[:3])))
    (tmp_path / "r2.json").write_text(json.dumps(judged("s1", choices[3:])))
    w = evaluate.main(["--study", str(tmp_path / "r1.json"), str(tmp_path / "r2.json")])
    assert (w["wins"], w["ties"], w["losses"]) == (3, 1, 2) and w["win_rate"] == pytest.approx(3.5 / 6)
    assert 0 <= w["ci95"][0] < w["win_rate"] < w["ci95"][1] <= 1
    assert "after vs before: 3 wins, 1 ties, 2 losses in 6 judgements; win rate 0.583" in capsys.readouterr().out


def test_bad_study_inputs_are_one_line(runs, tmp_path):
    (tmp_path / "r1.json").write_text(json.dumps(judged("s1", [("after", "left")])))
    (tmp_path / "other.json").write_text(json.dumps(judged("s2", [("after", "left")])))
    (tmp_path / "notstudy.json").write_text(json.dumps({"summary": {}}))
    os.makedirs(tmp_path / "elsewhere")
    cases = [(["--study", str(tmp_path / "r1.json"), str(tmp_path / "other.json")], "results of another study"),
             (["--study", str(tmp_path / "notstudy.json")], "is not the results file of an evaluate.py study"),
             (["--compare", runs[0], "--study-html", str(tmp_path / "s.html")], "--study-html compares two runs"),
             ([str(tmp_path / "elsewhere"), "--metrics", "temporal_flickering"], "no .mp4 files")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert message in str(e.value) and "\n" not in str(e.value)
    a = json.load(open(runs[0]))
    b = {**a, "name": "other", "videos": {"a cat-0.mp4": {"prompt": "a cat"}}}  # mismatched folders
    with pytest.raises(UserError, match="share no video file name"):
        page.study_pairs(a, b)
    gone = {**a, "video_dir": str(tmp_path / "moved")}  # results whose videos are no longer there
    with pytest.raises(UserError, match="cannot read video"):
        page.comparison_page([gone], "| a |\n|---|\n| 1 |", [])


def test_a_study_feeds_reward_agreement(runs, tmp_path):
    a, b = (json.load(open(r)) for r in runs)
    study, pairs = page.study_pairs(a, b)
    # a rater who always picks the 'after' video (less flicker)
    results = {"study": study, "runs": ["before", "after"], "judgements": [
        {"pair": i, "prompt": p["prompt"], "videos": p["videos"], "runs": p["runs"],
         "choice": "left" if p["runs"][0] == "after" else "right"} for i, p in enumerate(pairs)]}
    (tmp_path / "study.json").write_text(json.dumps(results))
    out = agreement.main([str(tmp_path / "study.json"), "--reward", "pixel"])
    assert out["temporal_consistency"]["recall@1"] == 1.0  # the flicker score agrees with this rater on every pair
