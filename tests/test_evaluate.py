"""evaluate.py: VBench-style metrics on synthetic videos whose answers are known, with tiny random DINO/CLIP models
(the formulas and the preprocessing are under test, not the weights), the LAION aesthetic reward, tables and plots."""
import importlib.util
import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch

import evaluate
import fvd
from image_rewards import AestheticReward, vbench_preprocess
from model import UserError
from reward import build_reward
from videos import write_video

T, H, W = 6, 32, 48


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Small random DINO / CLIP / CLIP-L-with-LAION-head saved to disk and loaded back through from_pretrained."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16, initializer_range=0.2), add_pooling_layer=False
             ).save_pretrained(root / "dino")
    clip = lambda proj: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=32, projection_dim=proj, initializer_factor=5.0))
    clip(16).save_pretrained(root / "clip")
    clip(768).save_pretrained(root / "clip_l")
    head = torch.nn.Linear(768, 1)
    torch.nn.init.normal_(head.weight, std=1.0)
    torch.save(head.state_dict(), root / "head.pth")
    save_file(head.state_dict(), str(root / "head.safetensors"))
    return {k: str(root / k) for k in ("dino", "clip", "clip_l", "head.pth", "head.safetensors")}


def synthetic_videos(folder):
    """static: one smooth image repeated; moving: the image sliding 2 px a frame; noise: fresh noise every frame
    (3 frames longer, so that frame-weighted and per-video means differ)."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(H, W + 2 * T), mode="bilinear")
    image = (image[0].permute(1, 2, 0) * 255).to(torch.uint8)
    videos = {"a still lake-0.mp4": image[:, :W].expand(T, H, W, 3),
              "a car driving-0.mp4": torch.stack([image[:, 2 * t:2 * t + W] for t in range(T)]),
              "tv static-0.mp4": torch.randint(0, 256, (T + 3, H, W, 3), dtype=torch.uint8, generator=g)}
    os.makedirs(folder, exist_ok=True)
    for name, v in videos.items():
        write_video(os.path.join(folder, name), v, fps=8)
    return videos


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    synthetic_videos(folder)
    (folder / "broken-0.mp4").write_bytes(os.urandom(2000))  # corrupt
    (folder / "empty-0.mp4").write_bytes(b"")
    out = folder / "evaluation.json"
    evaluate.main([str(folder), "--dino", tiny_models["dino"], "--clip", tiny_models["clip"], "--aesthetic-clip",
                   tiny_models["clip_l"], "--aesthetic-head", tiny_models["head.pth"], "--reward", "pixel",
                   "--out", str(out), "--device", "cpu"])
    return json.loads(out.read_text())


def test_static_video_is_perfectly_consistent_and_noise_scores_lower(results):
    still, moving, noise = (results["videos"][n] for n in ("a still lake-0.mp4", "a car driving-0.mp4",
                                                           "tv static-0.mp4"))
    assert still["temporal_flickering"] == 1.0  # H.264 repeats a still frame exactly
    assert still["subject_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert still["background_consistency"] == pytest.approx(1.0, abs=1e-5)
    for m in ("temporal_flickering", "subject_consistency", "background_consistency", "proxy_interp_smoothness"):
        assert noise[m] < moving[m] <= still[m] + 1e-6, m
    assert noise["temporal_flickering"] < 0.8
    assert still["proxy_frame_motion"] == 0.0 and noise["proxy_frame_motion"] > moving["proxy_frame_motion"] > 0
    for row in results["videos"].values():
        for m in ("temporal_flickering", "subject_consistency", "background_consistency", "proxy_interp_smoothness",
                  "proxy_frame_motion"):
            assert 0.0 <= row[m] <= 1.0 + 1e-6, m
        assert row["pixel.temporal_consistency"] == pytest.approx(row["temporal_flickering"])


def test_corrupt_and_empty_videos_are_reported_and_skipped(results):
    assert sorted(results["skipped"]) == ["broken-0.mp4", "empty-0.mp4"]
    assert sorted(results["videos"]) == ["a car driving-0.mp4", "a still lake-0.mp4", "tv static-0.mp4"]
    assert results["videos"]["a car driving-0.mp4"]["prompt"] == "a car driving"


def test_summary_aggregates_as_vbench(results):
    v, s = results["videos"].values(), results["summary"]
    assert s["temporal_flickering"] == pytest.approx(sum(r["temporal_flickering"] for r in v) / 3)
    weighted = sum(r["subject_consistency"] * (r["frames"] - 1) for r in v)  # consistency: over all frames
    assert s["subject_consistency"] == pytest.approx(weighted / sum(r["frames"] - 1 for r in v))
    assert "dynamic_degree" not in s and "motion_smoothness" not in s and "imaging_quality" not in s
    q = ((s["subject_consistency"] - 0.1462) / 0.8538 + (s["background_consistency"] - 0.2615) / 0.7385 +
         (s["temporal_flickering"] - 0.6293) / 0.3707 + s["aesthetic_quality"]) / 4
    assert results["quality_score"] == pytest.approx(q) and results["quality_dims"] == 4


def test_quality_score_uses_vbench_weights():
    all7 = {d: hi for d, (lo, hi, w) in evaluate.VBENCH_QUALITY.items()}  # every dimension at VBench's Max
    assert evaluate.quality_score(all7) == (pytest.approx(1.0), 7)
    all7["dynamic_degree"] = 0.0  # weight 0.5 of 6.5
    assert evaluate.quality_score(all7)[0] == pytest.approx(6 / 6.5)
    assert evaluate.quality_score({"proxy_frame_motion": 0.3}) == (None, 0)


def test_consistency_formula_on_known_features():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])
    # frame 1: prev 0, first 0 -> 0; frame 2: prev 0, first 1 -> 0.5; frame 3: prev -1 -> 0, first -1 -> 0
    assert evaluate.consistency(f) == pytest.approx(0.5 / 3)


def test_preprocessing_matches_torchvision_sizes_and_crop_offsets():
    wide = torch.zeros(1, 240, 426, 3, dtype=torch.uint8)  # short side 224, long side int(224 * 426 / 240) = 397
    assert vbench_preprocess(wide, 224, "bilinear", False, (0,) * 3, (1,) * 3).shape == (1, 3, 224, 397)
    tall = torch.zeros(2, 426, 240, 3, dtype=torch.uint8)
    assert vbench_preprocess(tall, 224, "bicubic", True, (0,) * 3, (1,) * 3).shape == (2, 3, 224, 224)
    # already 224 high: no resize; crop left offset int(round((397 - 224) / 2)) = 86 (Python rounds half to even)
    cols = torch.arange(397, dtype=torch.float32).view(1, 1, 397, 1).expand(1, 224, 397, 3)
    x = vbench_preprocess(cols, 224, "bicubic", True, (0,) * 3, (1 / 255,) * 3)
    assert x[0, 0, 0, 0].item() == pytest.approx(86.0) and x[0, 0, 0, -1].item() == pytest.approx(86.0 + 223)


def test_aesthetic_reward_is_the_frame_mean_differentiable_and_loads_both_head_formats(tiny_models):
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (1, 4, 40, 30, 3), dtype=torch.uint8, generator=g)
    kw = dict(clip=tiny_models["clip_l"], batch=3)
    r = build_reward("aesthetic", path=tiny_models["head.pth"], **kw)  # train.py's --reward-path
    per_frame = torch.cat([r.score(video[:, t:t + 1], ["x"])["aesthetic"] for t in range(4)])
    assert r.score(video, ["x"])["aesthetic"].item() == pytest.approx(per_frame.mean().item(), abs=1e-5)
    assert per_frame.std() > 1e-3  # the frames do score differently: the mean is a real test
    r2 = AestheticReward(head=tiny_models["head.safetensors"], **kw)
    assert r2.score(video, ["x"])["aesthetic"].item() == pytest.approx(r.score(video, ["x"])["aesthetic"].item())
    x = video.float().requires_grad_()  # ReFL: differentiable in the pixels, the reward itself frozen
    r.score_float(x, ["x"])["aesthetic"].sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in r.clip.parameters())
    with pytest.raises(UserError, match="sa_0_4_vit_l_14_linear.pth"):
        AestheticReward(head="/nonexistent/sa_0_4_vit_l_14_linear.pth", **kw)


def test_missing_model_skips_its_metric_with_one_line(tmp_path, capsys):
    synthetic_videos(tmp_path / "v")
    evaluate.main([str(tmp_path / "v"), "--dino", str(tmp_path / "no-dino"), "--metrics",
                   "subject_consistency,temporal_flickering,dynamic_degree", "--reward", "aesthetic=/no/head.pth"])
    out = capsys.readouterr().out
    assert out.count("skipping subject_consistency:") == 1 and "skipping dynamic_degree: " in out  # no torchvision here, or no weights
    assert "skipping reward aesthetic: UserError: LAION aesthetic head /no/head.pth not found" in out
    res = json.loads((tmp_path / "v" / "evaluation.json").read_text())
    assert list(res["summary"]) == ["temporal_flickering"]


def test_compare_table_and_plots(tmp_path, capsys):
    def fake(name, tf):
        return {"name": name, "summary": {"subject_consistency": 0.95, "temporal_flickering": tf,
                                          "proxy_frame_motion": 0.1, "pixel.colorfulness": 0.2},
                "sources": {"subject_consistency": "evaluate.py", "temporal_flickering": "vbench"}}
    paths = []
    for name, tf in (("base", 0.97), ("vpo", 0.99)):
        paths.append(str(tmp_path / f"{name}.json"))
        json.dump(fake(name, tf), open(paths[-1], "w"))
    evaluate.main(["--compare", *paths, "--plot", str(tmp_path / "cmp.svg")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| model | Subject Consistency | Temporal Flickering | Quality Score | frame motion (proxy) "
                        "| pixel.colorfulness |")
    assert lines[3].startswith("| vpo | 95.00 | 99.00* | ") and "(2/7 dims)" in lines[3]  # * from --vbench
    svg = ET.parse(tmp_path / "cmp.svg").getroot()
    assert len([e for e in svg.iter() if e.tag.endswith("rect") and e.find("{*}title") is not None]) == 6


def test_reward_curve_marks_reference_updates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.5 + 0.01 * s, "reward_w": 0.6 + 0.01 * s, "reward_l": None if s == 2 else 0.4,
             "ref_updates": s // 3, "reward_dim": "temporal_consistency"} for s in range(1, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    json.dump({"k": 3}, open(run / "args.json", "w"))
    evaluate.main(["--run", str(run)])
    svg = ET.parse(run / "reward_curve.svg").getroot()
    marks = [e for e in svg.iter() if e.get("class") == "ref-update"]
    assert len(marks) == 2  # steps 3 and 6
    lines = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert [len(e.get("points").split()) for e in lines] == [7, 7, 6]  # the loser's None step is left out


def test_bad_input_is_one_line_error(tmp_path, capsys):
    for argv, msg in (([str(tmp_path / "nope")], "is not a folder"), ([str(tmp_path)], "no .mp4 files"),
                      (["--run", str(tmp_path)], "metrics.jsonl not found"), ([], "give exactly one of"),
                      ([str(tmp_path), "--metrics", "beauty"], "--metrics 'beauty': unknown metric")):
        if msg.endswith("unknown metric"):
            synthetic_videos(tmp_path)
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert str(e.value).startswith("error: ") and msg in str(e.value)


def test_full_info_scores_each_dimension_on_its_own_prompts(tmp_path):
    synthetic_videos(tmp_path / "v")
    info = [{"prompt_en": "a still lake", "dimension": ["temporal_flickering"]},
            {"prompt_en": "tv static", "dimension": ["dynamic_degree", "temporal_flickering"]}]
    json.dump(info, open(tmp_path / "full_info.json", "w"))
    evaluate.main([str(tmp_path / "v"), "--metrics", "temporal_flickering,proxy_frame_motion",
                   "--full-info", str(tmp_path / "full_info.json")])
    res = json.loads((tmp_path / "v" / "evaluation.json").read_text())
    v = res["videos"]
    assert "temporal_flickering" in v["a still lake-0.mp4"] and "proxy_frame_motion" not in v["a still lake-0.mp4"]
    assert "proxy_frame_motion" in v["tv static-0.mp4"]  # a proxy follows the prompts of the dimension it stands for
    assert set(v["a car driving-0.mp4"]) == {"prompt", "frames", "fps"}  # in no dimension's prompt list
    assert res["summary"]["temporal_flickering"] == pytest.approx(
        (v["a still lake-0.mp4"]["temporal_flickering"] + v["tv static-0.mp4"]["temporal_flickering"]) / 2)


def test_png_plot_needs_matplotlib_or_says_so(tmp_path):
    path = tmp_path / "r.json"
    json.dump({"name": "m", "summary": {"temporal_flickering": 0.9}}, open(path, "w"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="needs matplotlib"):
            evaluate.main(["--compare", str(path), "--plot", str(tmp_path / "c.png")])
    else:
        evaluate.main(["--compare", str(path), "--plot", str(tmp_path / "c.png")])
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_vbench_package_and_bad_results_file_are_one_line_errors(tmp_path):
    import importlib.util

    synthetic_videos(tmp_path / "v")
    if importlib.util.find_spec("vbench") is None:
        with pytest.raises(SystemExit, match="error: --vbench needs the official package"):
            evaluate.main([str(tmp_path / "v"), "--vbench", "custom"])
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="x.json' is not a JSON object"):
        evaluate.main(["--compare", str(tmp_path / "x.json")])


def test_dino_loads_with_dinos_eps_and_position_embedding_interpolation(tiny_models):
    dino = evaluate.load_dino(tiny_models["dino"], "cpu")
    assert dino.config.layer_norm_eps == 1e-6
    emb = dino.embeddings
    with torch.no_grad():  # a 14 x 14 grid whose value is its row index, resampled to 20 x 14 patches
        emb.position_embeddings[0, 1:] = torch.arange(14.0).repeat_interleave(14)[:, None]
        grid = emb.interpolate_pos_encoding(torch.zeros(1, 1 + 20 * 14, 32), 320, 224)[0, 1:, 0].view(20, 14)

    def bicubic_row(src, a=-0.75):  # PyTorch's cubic convolution at source row `src` of the row-index grid
        w = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return sum(w(abs(src - k)) * k for k in range(int(src) - 1, int(src) + 3))
    # DINO samples output row r at (r + 0.5) * 14 / 20.1 - 0.5 (scale_factor (20 + 0.1) / 14); transformers at / 20
    assert grid[10, 7].item() == pytest.approx(bicubic_row(10.5 * 14 / 20.1 - 0.5), abs=1e-5)
    assert abs(grid[10, 7].item() - bicubic_row(10.5 * 14 / 20 - 0.5)) > 1e-2


def test_reward_mix_column_ranks_each_prompts_videos_by_the_weighted_dimensions(tmp_path):
    """--reward a,b --reward-dim as train.py's: per video, the mix; within one prompt it orders the videos as the
    weighted dimensions do (here one dimension carries all but a sliver of the weight)."""
    g = torch.Generator().manual_seed(1)
    for prompt in ("a red circle moves left", "a blue bar moves up"):
        for i, level in enumerate((0, 40, 120)):  # more flicker, lower temporal consistency
            v = torch.full((T, H, W, 3), 100, dtype=torch.uint8)
            v = (v.int() + torch.randint(0, level + 1, (T, H, W, 3), generator=g)).clamp(0, 255).to(torch.uint8)
            write_video(str(tmp_path / f"{prompt}-{i}.mp4"), v, fps=8)
    out = tmp_path / "e.json"
    evaluate.main([str(tmp_path), "--metrics", "temporal_flickering", "--reward", "pixel,toy", "--reward-dim",
                   "pixel:temporal_consistency=1,toy:visual_quality=0.001", "--out", str(out)])
    rows = json.loads(out.read_text())["videos"]
    for prompt in ("a red circle moves left", "a blue bar moves up"):
        mine = [rows[f"{prompt}-{i}.mp4"] for i in range(3)]
        assert [r["reward_mix"] for r in mine] == sorted((r["reward_mix"] for r in mine), reverse=True)
        assert "toy.dynamic_degree" in mine[0] and "pixel.colorfulness" in mine[0]
    with pytest.raises(SystemExit, match="unknown reward dimension 'speed'"):
        evaluate.main([str(tmp_path), "--metrics", "temporal_flickering", "--reward", "toy", "--reward-dim", "speed"])


def test_dynamic_degree_follows_vbench_thresholds_and_verdict():
    # 6 * min(H, W) / 256 and round(4 T / 16), Python's round: T = 2 -> 0 pairs needed, 10 -> 2, 14 -> 4
    assert evaluate.dynamic_threshold(240, 426, 16) == (5.625, 4)
    assert [evaluate.dynamic_threshold(128, 128, t)[1] for t in (2, 6, 10, 14)] == [0, 2, 2, 4]
    x, thres, need = evaluate.raft_frames(torch.zeros(48, 130, 124, 3, dtype=torch.uint8), fps=24)
    assert x.shape == (16, 3, 136, 128) and need == 4  # every 3rd frame at 24 fps, padded to multiples of 8
    assert x.min() == -1  # RAFT's 2 x / 255 - 1

    class ConstantFlow(torch.nn.Module):  # stands in for RAFT: a flow of `speed` px everywhere, every pair
        def __init__(self, speed):
            super().__init__()
            self.speed = torch.nn.Parameter(torch.tensor(float(speed)))

        def forward(self, a, b, num_flow_updates):
            return [torch.ones(1, 2, *a.shape[2:]) * self.speed / 2 ** 0.5]

    video = torch.zeros(16, 128, 128, 3, dtype=torch.uint8)  # threshold 3.0 px, 4 moving pairs needed
    assert evaluate.dynamic_degree(video, 8, ConstantFlow(3.5)) == 1.0
    assert evaluate.dynamic_degree(video, 8, ConstantFlow(2.99)) == 0.0
    assert evaluate.dynamic_degree(video[:, :64, :64], 8, ConstantFlow(9)) is None  # too small for RAFT


def test_raft_things_keys_map_onto_torchvision_names():
    got = evaluate.raft_things_to_torchvision({k: torch.zeros(1) for k in [
        "module.fnet.conv1.weight", "module.cnet.norm1.running_mean", "module.fnet.layer1.0.conv2.weight",
        "module.cnet.layer2.0.norm3.weight", "module.cnet.layer2.0.downsample.1.weight",
        "module.update_block.encoder.convc1.weight", "module.update_block.encoder.conv.bias",
        "module.update_block.gru.convz1.weight", "module.update_block.mask.2.bias", "module.fnet.conv2.weight"]})
    assert list(got) == ["feature_encoder.convnormrelu.0.weight", "context_encoder.convnormrelu.1.running_mean",
                         "feature_encoder.layer1.0.convnormrelu2.0.weight", "context_encoder.layer2.0.downsample.1.weight",
                         "update_block.motion_encoder.convcorr1.0.weight", "update_block.motion_encoder.conv.0.bias",
                         "update_block.recurrent_block.convgru1.convz.weight", "mask_predictor.conv.bias",
                         "feature_encoder.conv.weight"]


def test_imaging_quality_resizes_the_longer_side_to_512_and_scores_every_frame(tmp_path, capsys):
    seen = []

    class Recorder(torch.nn.Module):  # stands in for MUSIQ: records what it is given, scores 70 (of 0..100)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append((tuple(x.shape), x.max().item()))
            return torch.tensor([[70.0]])

    frames = torch.full((3, 270, 600, 3), 255, dtype=torch.uint8)
    assert evaluate.imaging_quality(frames, Recorder()) == pytest.approx(0.70)
    # int(512 / 600 * 270) = 230; one frame at a time, on 0..1 (torch's bilinear resize takes another kernel with one
    # thread and 3 channels, which rounds 255 to 254.99998 or 255.00002: hence approx)
    assert [s for s, _ in seen] == [(1, 3, 230, 512)] * 3 and [m for _, m in seen] == pytest.approx([1.0] * 3)
    seen.clear()
    evaluate.imaging_quality(frames[:, :200, :300], Recorder())
    assert seen[0][0] == (1, 3, 200, 300)  # 512 or less: untouched
    synthetic_videos(tmp_path / "v")
    evaluate.main([str(tmp_path / "v"), "--metrics", "imaging_quality,temporal_flickering",
                   "--musiq", str(tmp_path / "none.pth")])
    assert "skipping imaging_quality: UserError: " in capsys.readouterr().out  # no pyiqa here, or no weights


def test_fvd_clips_as_cd_fvd_prepares_them_and_bad_folders_are_one_line(tmp_path):
    frames = torch.randint(0, 256, (20, 48, 64, 3), dtype=torch.uint8)
    clip = fvd.fvd_clip(frames, resolution=32)
    assert clip.shape == (1, 16, 32, 32, 3) and clip.dtype == torch.uint8  # first 16 frames, short side, centre
    x = torch.nn.functional.interpolate(frames[:16].permute(0, 3, 1, 2).float() / 255, size=(32, 43),
                                        mode="bilinear", antialias=True)[:, :, :, 5:37]
    assert torch.equal(clip[0], (x * 255).to(torch.uint8).permute(0, 2, 3, 1))  # truncated, as the package
    with pytest.raises(UserError, match="a 8-frame video: FVD takes the first 16 frames"):
        fvd.fvd_clip(frames[:8])
    synthetic_videos(tmp_path / "gen")
    os.makedirs(tmp_path / "empty")
    cases = [(tmp_path / "empty", "holds 0 .mp4 files; a Frechet distance needs at least 2"),
             (tmp_path / "nowhere", "is not a folder")]
    if importlib.util.find_spec("cdfvd") is None:  # the package is not installed: its install line
        cases.append((tmp_path / "gen", "--fvd needs the cd-fvd package: pip install cd-fvd"))
    for ref, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(tmp_path / "gen"), "--metrics", "temporal_flickering", "--fvd", str(ref)])
        assert message in str(e.value) and "\n" not in str(e.value)
