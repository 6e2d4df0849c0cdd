"""Reward agreement with human choices (paper Table 2): MRR and Recall@k, ties, the manifest CLI."""
import json

import pytest
import torch

import agreement
from videos import write_video


def test_mrr_and_recall_with_known_answers_and_ties():
    scores = [[0.1, 0.9, 0.5],     # best ranked 1st
              [3.0, 2.0, 1.0, 0.0],  # best (index 2) ranked 3rd
              [1.0, 1.0, 0.0, 2.0]]  # best tied with one other behind one higher: rank 2 or 3, half each
    got = agreement.agreement(scores, best=[1, 2, 0])
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + (1 / 2 + 1 / 3) / 2) / 3)
    assert got["recall@1"] == pytest.approx(1 / 3)
    assert got["recall@2"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert got["recall@4"] == pytest.approx(1.0)
    # a constant reward is at chance level, not perfect: 4 tied candidates -> MRR (1 + 1/2 + 1/3 + 1/4) / 4
    flat = agreement.agreement([[5.0] * 4], best=[3])
    assert flat["mrr"] == pytest.approx(25 / 48) and flat["recall@1"] == 0.25 and flat["recall@2"] == 0.5


def write_group(folder, name, n_noisy):
    """One static video (the human's pick) and n_noisy flickering ones."""
    static = torch.full((6, 16, 16, 3), 90, dtype=torch.uint8)
    write_video(str(folder / f"{name}-0.mp4"), static, fps=8)
    g = torch.Generator().manual_seed(len(name))
    for i in range(1, n_noisy + 1):
        noise = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8, generator=g)
        write_video(str(folder / f"{name}-{i}.mp4"), noise, fps=8)
    return [f"{name}-{i}.mp4" for i in range(n_noisy + 1)]


def test_agreement_cli_on_a_synthetic_manifest(tmp_path, capsys):
    a, b = write_group(tmp_path, "a", 3), write_group(tmp_path, "b", 2)
    manifest = [{"prompt": "a ball", "videos": a, "best": a[0]},  # best by name
                {"prompt": "a cube", "videos": b, "best": 1}]    # best by index: a flickering one
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = agreement.main([str(tmp_path / "m.json"), "--reward", "pixel", "--device", "cpu",
                          "--out", str(tmp_path / "agreement.json")])
    assert json.loads((tmp_path / "agreement.json").read_text()) == out
    tc = out["temporal_consistency"]  # static video: flicker score 1.0, ranked first; group b's pick is not
    assert tc["recall@1"] == 0.5 and tc["recall@4"] == 1.0 and 0.5 + 0.25 / 2 <= tc["mrr"] < 1.0
    assert set(out) == {"temporal_consistency", "colorfulness", "global"}
    table = capsys.readouterr().out.splitlines()  # Table 2's layout: a row per reward dimension
    assert table[0] == "| reward | MRR | Recall@1 | Recall@2 | Recall@4 |"
    assert table[2] == f"| temporal_consistency | {tc['mrr']:.3f} | 0.500 | {tc['recall@2']:.3f} | 1.000 |"


def test_agreement_of_a_mix_ranks_by_the_weighted_dimensions(tmp_path):
    """A mix of two rewards' dimensions gets its own row; weighting one dimension far above the other gives that
    dimension's agreement, whichever reward's scale it is on."""
    a, b = write_group(tmp_path, "a", 3), write_group(tmp_path, "b", 2)
    (tmp_path / "m.json").write_text(json.dumps([{"prompt": "a ball", "videos": a, "best": 0},
                                                 {"prompt": "a cube", "videos": b, "best": 1}]))
    spec = "pixel:temporal_consistency=1,toy:color_alignment=0.001"
    out = agreement.main([str(tmp_path / "m.json"), "--reward", "pixel,toy", "--reward-dim", spec])
    assert out[spec] == out["pixel:temporal_consistency"]
    assert "toy:dynamic_degree" in out and "global" in out


def test_bad_manifest_or_video_is_one_line(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    a = write_group(tmp_path, "a", 1)
    cases = {"missing.json": None,
             "one.json": [{"prompt": "x", "videos": a[:1], "best": 0}],
             "best.json": [{"prompt": "x", "videos": a, "best": "c.mp4"}],
             "unreadable.json": [{"prompt": "x", "videos": [a[0], "broken.mp4"], "best": 0}]}
    messages = {"missing.json": "missing.json' not found", "one.json": "at least two 'videos'",
                "best.json": "'best' must be one of its videos", "unreadable.json": "cannot read video"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(SystemExit) as e:
            agreement.main([str(tmp_path / name), "--reward", "pixel", "--device", "cpu"])
        err = str(e.value)  # inputs.command's sys.exit("error: ..."): Python prints it to stderr, exit status 1
        assert err.startswith("error: ") and messages[name] in err and "\n" not in err
