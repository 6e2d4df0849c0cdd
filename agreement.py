"""Reward agreement with human choices (paper Table 2): for groups of candidate videos of one prompt with a
human-chosen best, where does the reward rank that best one? MRR and Recall@k over groups, per reward dimension.

    python agreement.py manifest.json --reward videoscore
    python agreement.py study.json --reward videoscore,aesthetic --reward-dim temporal_consistency=1,aesthetic=0.5
The manifest is a JSON list of groups, or the results file of an evaluate.py blind study (page.py).
"""
import argparse
import json
import os

from inputs import ANY, UserError, check_domains, command, read_text, refuse_empty, writable_file, write_atomically

import torch  # noqa: E402  (inputs first: Ctrl-C during these slow imports is one line too)

import page  # noqa: E402
from reward import REWARD_DOMAINS, add_reward_args, build_reward, parse_dim, pick, reward_dims  # noqa: E402
from videos import read_fps, read_video  # noqa: E402


def agreement(scores: list[list[float]], best: list[int], ks: tuple = (1, 2, 4)) -> dict[str, float]:
    """scores[g][j] = reward of candidate j in group g (higher is better); best[g] = the human's choice.
    Ties are explicit: the best candidate's rank is uniform over the positions its tie group occupies (the
    expected value under random tie-breaking), so a constant reward gets the chance level, not 1.0 or 0."""
    rr, hits = [], {k: [] for k in ks}
    for s, b in zip(scores, best):
        s = torch.as_tensor(s, dtype=torch.float64)
        above = int((s > s[b]).sum())
        ranks = torch.arange(above + 1, above + int((s == s[b]).sum()) + 1, dtype=torch.float64)  # 1-based
        rr.append((1 / ranks).mean().item())
        for k in ks:
            hits[k].append((ranks <= k).double().mean().item())
    mean = lambda v: sum(v) / len(v)
    return {"mrr": mean(rr), **{f"recall@{k}": mean(v) for k, v in hits.items()}}


def read_manifest(path: str) -> list[dict]:
    """A JSON list of groups {"prompt": str, "videos": [paths relative to the manifest], "best": path or index}, or
    the results of an evaluate.py study (each decided pair a group of two)."""
    try:
        groups = json.loads(read_text(path, "manifest"))  # missing, binary or not UTF-8: one line from read_text
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read manifest {path}: {e}") from None
    if isinstance(groups, dict) and "judgements" in groups:  # an evaluate.py study's results (page.py)
        groups = page.study_manifest(page.read_study([path]))
        if not groups:
            raise UserError(f"{path}: every judgement of this study is a tie; no human choice to agree with")
    if not isinstance(groups, list) or not groups:
        raise UserError(f"manifest {path} must be a non-empty JSON list of groups, or a study's results")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("prompt"), str) or len(g.get("videos") or []) < 2:
            raise UserError(f"manifest group {i}: needs a 'prompt' and at least two 'videos'")
        if not isinstance(g["videos"], list) or not all(isinstance(v, str) for v in g["videos"]):
            raise UserError(f"manifest group {i}: 'videos' must be a list of file paths")
        best = g.get("best")
        best = g["videos"].index(best) if best in g["videos"] else best
        if not isinstance(best, int) or not 0 <= best < len(g["videos"]):
            raise UserError(f"manifest group {i}: 'best' must be one of its videos or an index, got {g.get('best')!r}")
        out.append({"prompt": g["prompt"], "videos": [os.path.join(root, v) for v in g["videos"]], "best": best})
    return out


def score_files(reward, paths: list[str], prompt: str) -> dict[str, torch.Tensor]:
    """Scores of video files for one prompt: one batch when the videos share a shape and frame rate, else one by
    one."""
    videos, rates = [read_video(p) for p in paths], [read_fps(p) for p in paths]
    if all(v.shape == videos[0].shape for v in videos) and len(set(rates)) == 1:
        return reward.score(torch.stack(videos), [prompt] * len(videos), rates[0])
    each = [reward.score(v[None], [prompt], fps) for v, fps in zip(videos, rates)]
    return {d: torch.cat([e[d] for e in each]) for d in each[0]}


def run_agreement(manifest: str, reward, dim: str | None = None) -> dict:
    """Agreement of every dimension, of `global`, and of --reward-dim `dim` if given (a mix is scaled by the
    spread within the manifest's groups, pooled over all of them, as in training)."""
    groups = read_manifest(manifest)
    if dim is not None:
        parse_dim(dim, reward.dims)  # before minutes of scoring
    per_group = [score_files(reward, g["videos"], g["prompt"]) for g in groups]
    best = [g["best"] for g in groups]
    result = {d: agreement([pick(s, d).tolist() for s in per_group], best) for d in reward.dims + ["global"]}
    if dim is not None and dim not in result:
        ids = torch.cat([torch.full((len(g["videos"]),), i) for i, g in enumerate(groups)])
        joined = pick({d: torch.cat([s[d] for s in per_group]) for d in reward.dims}, dim, group=ids)
        result[dim] = agreement(list(joined.split([len(g["videos"]) for g in groups])), best)
    return result


def agreement_table(result: dict) -> str:
    """Paper Table 2's layout: a row per reward dimension (and global, and a mix), MRR and Recall@k."""
    cols = list(next(iter(result.values())))
    head = "| reward | " + " | ".join(c.replace("mrr", "MRR").replace("recall@", "Recall@") for c in cols) + " |"
    rows = [f"| {d} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for d, v in result.items()]
    return "\n".join([head, "|" + "---|" * (len(cols) + 1), *rows])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure a reward's agreement with human choices (MRR, Recall@1/2/4; "
                                "paper Table 2).")
    p.add_argument("manifest", help="a manifest JSON, or the results of an evaluate.py study")
    p.add_argument("--reward-dim", default=None, help="also a weighted mix of dimensions, as train.py's "
                   "(e.g. videoscore:temporal_consistency=1,aesthetic=0.5)")
    add_reward_args(p, "the result")
    return p


DOMAINS = REWARD_DOMAINS + [
    ("reward_dim", lambda v, a: bool(parse_dim(v, reward_dims(a.reward))), ""),  # parse_dim names a bad one itself
    ("manifest", ANY, ""),  # read_manifest checks the file
]


@command()
def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    refuse_empty(args, p)
    check_domains(args, DOMAINS)
    if args.out:
        writable_file(args.out, "--out")
    reward = build_reward(args.reward, device=args.device, path=args.reward_path, batch_size=args.reward_batch)
    result = run_agreement(args.manifest, reward, args.reward_dim)
    print(agreement_table(result))
    if args.out:
        write_atomically(args.out, [json.dumps(result, indent=1)])
    return result


if __name__ == "__main__":
    main()
