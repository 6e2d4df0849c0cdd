"""Tables, charts and pages of evaluate.py's results, drawn without torch: the markdown table (the paper's Table 3
layout), SVG or PNG charts (the per-dimension comparison; a training run's reward curve, the paper's Fig. 5),
and pages to look at and judge videos, one self-contained HTML file each (videos inlined as data URIs, no server,
no network, no script from elsewhere).

    python evaluate.py --compare before/evaluation.json after/evaluation.json --plot compare.svg
    python evaluate.py --run runs/vpo                          # -> runs/vpo/reward_curve.svg
    python evaluate.py --compare before/evaluation.json after/evaluation.json --html page.html --run runs/vpo
    python evaluate.py --compare before/evaluation.json after/evaluation.json --study-html study.html
    python evaluate.py --study rater1.json rater2.json          # win rate with a 95% confidence interval

- The table and the comparison chart: evaluate.py hands them what it measures (VBench's quality dimensions, its
  proxies, the quality score); this module imports neither evaluate.py nor torch.
- The comparison page: for each prompt, the videos of every compared run side by side (before / after), then the
  metric table and the reward curves of the training runs.
- The study (paper Fig. 4): pairs of videos of one prompt, one from each of two runs, in a random order and on
  random sides, labelled "Video 1" / "Video 2". One click records a judgement and shows the next pair; the
  judgements are saved as JSON (a download), which `--study` turns into a win rate and `agreement.py` into
  a reward/human agreement (Table 2). The page's source holds which run is which: raters should only click.
"""
import base64
import hashlib
import html
import importlib.util
import json
import os
import random
import sys
from collections.abc import Callable

from inputs import UserError, check_fields, read_json, read_metrics, writable_file

# ----------------------------------------------------------------------------------------------------------
# Tables: the paper's Table 3 layout, a row per model, a column per dimension

PROXY_LABELS = {"proxy_interp_smoothness": "interp. smoothness (proxy)", "proxy_frame_motion": "frame motion (proxy)"}


def header(column: str, vbench: dict) -> str:
    """VBench's dimensions as its tables name them, the proxies marked as stand-ins, anything else as named."""
    return column.replace("_", " ").title() if column in vbench else PROXY_LABELS.get(column, column)


def columns(results: list[dict], vbench: dict, proxies: dict) -> list[str]:
    """Every summary key of the results: VBench's dimensions and the proxies in their order, then the rest."""
    present = dict.fromkeys(k for r in results for k in r["summary"])
    return ([d for d in vbench if d in present] + [p for p in proxies if p in present] +
            [k for k in present if k not in vbench and k not in proxies])


def table(results: list[dict], vbench: dict, proxies: dict, score: Callable[[dict], tuple]) -> str:
    """Markdown table of evaluate.py results. `vbench` (evaluate.VBENCH_QUALITY) names VBench's dimensions, shown
    in percent as VBench reports them and followed by the quality score (`score(summary) -> (score, dimensions
    used)`); `proxies` (evaluate.PROXIES) come next, then rewards, FVD and the rest. * marks a number that came from
    the official vbench package (--vbench)."""
    cols = columns(results, vbench, proxies)
    head = ["model"] + [header(c, vbench) for c in cols if c in vbench] + ["Quality Score"] + \
           [header(c, vbench) for c in cols if c not in vbench]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, official = r["summary"], [c for c, src in r.get("sources", {}).items() if src == "vbench"]
        cell = lambda c, pct: "-" if s.get(c) is None else f"{100 * s[c]:.2f}{'*' * (c in official)}" if pct \
            else f"{s[c]:.4f}"
        q, n = score(s)
        row = [r["name"]] + [cell(c, True) for c in cols if c in vbench]
        row += ["-" if q is None else f"{100 * q:.2f} ({n}/{len(vbench)} dims)"]
        row += [cell(c, False) for c in cols if c not in vbench]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_table(md: str, transpose: bool = False) -> str:
    """table()'s markdown -> an HTML table; `transpose`: a row per metric and a column per model, which fits a
    window's width however many metrics there are (the page's layout)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.strip() and not set(line.strip()) <= set("|-: ")]
    if transpose:
        rows = [list(col) for col in zip(*rows)]
    head, body = rows[0], rows[1:]
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")


# ----------------------------------------------------------------------------------------------------------
# Charts: SVG written by hand, PNG through matplotlib

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def chart(path: str, title: str, series: dict, xlabels: list[str] | None = None, vlines=()):
    """Lines (series name -> [(x, y)], dashed vertical lines at `vlines`) or, given `xlabels`, grouped bars (series
    name -> [y or None per label]); SVG written by hand, or PNG through matplotlib when `path` ends with .png."""
    (png_chart if path.lower().endswith(".png") else svg_chart)(path, title, series, xlabels, vlines)


def svg_chart(path, title, series, xlabels, vlines):
    with open(path, "w") as f:
        f.write(svg(title, series, xlabels, vlines))


def svg(title: str, series: dict, xlabels: list[str] | None = None, vlines=()) -> str:
    """The chart as SVG text (chart's arguments)."""
    W, H, L, R, T, B = 840, 380, 60, 250, 40, 70
    bars = xlabels is not None
    ys = [v for vals in series.values() for v in vals if v is not None] if bars else \
         [y for pts in series.values() for _, y in pts]
    lo, hi = (min(ys + [0.0]), max(ys + [0.0])) if bars else (min(ys), max(ys))
    pad = 0.05 * (hi - lo) or 0.5
    lo, hi = (lo if bars and lo == 0 else lo - pad), hi + pad
    xs = [x for pts in series.values() for x, _ in pts] + list(vlines) if not bars else [0, len(xlabels)]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    X = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    Y = lambda y: T + (hi - y) / (hi - lo) * (H - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/><text x="{L}" y="22" font-size="13">{esc(title)}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(5):  # y grid
        y = lo + (hi - lo) * i / 4
        out.append(f'<line x1="{L}" y1="{Y(y):.1f}" x2="{W - R}" y2="{Y(y):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for v in vlines:  # reference updates
        out.append(f'<line class="ref-update" x1="{X(v):.1f}" y1="{T}" x2="{X(v):.1f}" y2="{H - B}" '
                   'stroke="gray" stroke-dasharray="4,3"/>')
    for j, (name, vals) in enumerate(series.items()):
        color = COLORS[j % len(COLORS)]
        out.append(f'<rect x="{W - R + 12}" y="{T + 16 * j}" width="12" height="10" fill="{color}"/>'
                   f'<text x="{W - R + 30}" y="{T + 16 * j + 9}">{esc(name)}</text>')  # legend
        if not bars:
            pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in vals)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
            continue
        w = 0.8 / len(series)
        for i, v in enumerate(vals):
            if v is not None:
                out.append(f'<rect x="{X(i + 0.1 + j * w):.1f}" y="{Y(max(v, 0)):.1f}" width="{X(w) - X(0):.1f}" '
                           f'height="{abs(Y(v) - Y(0)):.1f}" fill="{color}"><title>{esc(name)}: {v:.4f}</title></rect>')
    for i, label in enumerate(xlabels or []):
        out.append(f'<text x="{X(i + 0.5):.1f}" y="{H - B + 14}" text-anchor="end" '
                   f'transform="rotate(-20 {X(i + 0.5):.1f} {H - B + 14})">{esc(label)}</text>')
    if not bars:
        ticks = sorted({round(x0 + (x1 - x0) * i / 4) for i in range(5)})  # steps are integers
        out += [f'<text x="{X(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>' for x in ticks]
        out.append(f'<text x="{(L + W - R) / 2}" y="{H - B + 34}" text-anchor="middle">optimizer step</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def esc(s) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def png_chart(path, title, series, xlabels, vlines):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("a .png plot needs matplotlib (pip install matplotlib); or write .svg")
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (name, vals) in enumerate(series.items()):
        if xlabels is None:
            ax.plot(*zip(*vals), label=name)
        else:
            w = 0.8 / len(series)
            ax.bar([i + 0.1 + (j + 0.5) * w for i in range(len(vals))], [v or 0 for v in vals], w, label=name)
    for v in vlines:
        ax.axvline(v, color="gray", linestyle="--", linewidth=0.8)
    if xlabels is None:
        ax.set_xlabel("optimizer step")
    else:
        ax.set_xticks([i + 0.5 for i in range(len(xlabels))], xlabels, rotation=20, ha="right")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def check_plot(path: str) -> str:
    """The plot file can be written, and drawn (.png needs matplotlib): known before any scoring."""
    writable_file(path, "--plot")
    if path.lower().endswith(".png") and importlib.util.find_spec("matplotlib") is None:
        raise UserError("a .png plot needs matplotlib (pip install matplotlib); or write .svg")
    return path


def plot_comparison(results: list[dict], path: str, vbench: dict, proxies: dict):
    """Grouped bars, a group per dimension, a bar per run (table()'s arguments)."""
    # VBench's dimensions and the proxies share the 0..1 scale; rewards (reward.dim) have scales of their own
    cols = [c for c in columns(results, vbench, proxies) if "." not in c]
    series = {r["name"]: [r["summary"].get(c) for c in cols] for r in results}
    chart(path, "per-dimension comparison", series, xlabels=[header(c, vbench) for c in cols])


# ----------------------------------------------------------------------------------------------------------
# The reward curve of a training run (paper Fig. 5), from train.py's metrics.jsonl


def read_run_metrics(path: str) -> list[dict]:
    """inputs.read_metrics, and at least one whole row to draw."""
    rows = read_metrics(path)
    if not rows:
        raise UserError(f"{path} holds no whole metrics row")
    return rows


def run_args(run_dir: str) -> dict:
    """The run's args.json, for titles and labels only: {} (with a warning if the file is there but unreadable)."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        return {}
    try:
        args = read_json(path, "args file")
        if isinstance(args, dict):
            return args
        print(f"warning: {path} holds no flags; K shown as ?", file=sys.stderr)
    except UserError as e:
        print(f"warning: {path} is unreadable ({str(e).splitlines()[0]}); K shown as ?", file=sys.stderr)
    return {}


def plot_reward_curve(run_dir: str, path: str):
    """Paper Fig. 5 as a file (see reward_curve)."""
    title, series, updates = reward_curve(run_dir)
    writable_file(path, "--plot")  # here, not in main: the default path is inside a run folder known to exist now
    chart(path, title, series, vlines=updates)
    return updates


def reward_curve(run_dir: str) -> tuple[str, dict, list[int]]:
    """Paper Fig. 5: mean / winner / loser reward of each optimizer step from train.py's metrics.jsonl; dashed lines
    where the reference model was updated (every K steps). Returns (title, series, update steps)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{metrics} not found: --run takes a train.py output folder")
    rows = read_run_metrics(metrics)
    args = run_args(run_dir)
    k = args.get("k", "?")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    series = {label: [(r["step"], r[key]) for r in rows if number(r.get(key))]
              for key, label in (("reward_mean", "mean of N"), ("reward_w", "winner"), ("reward_l", "loser"))}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise UserError(f"{metrics} holds no reward values")
    held = [r for r in rows if number(r.get("eval_heldout")) and number(r.get("eval_trained"))]
    if held:  # --eval-reward: the trained and the held-out reward of the fixed eval samples
        series["eval: trained"] = [(r["step"], r["eval_trained"]) for r in held]
        series[f"eval: held-out {args.get('eval_reward', '?')}"] = [(r["step"], r["eval_heldout"]) for r in held]
    # train.py logs the cumulative count of reference updates (G_ref <- G_theta every K steps): mark where it grows
    counts = [0] + [r.get("ref_updates", 0) for r in rows]
    updates = [r["step"] for r, before in zip(rows, counts) if r.get("ref_updates", 0) > before]
    title = f"reward ({rows[-1].get('reward_dim', '?')}); dashed: reference update (K = {k})"
    return title, series, updates


# ----------------------------------------------------------------------------------------------------------
# The comparison page

STYLE = """body{font-family:sans-serif;margin:24px;color:#222}video{width:100%;max-width:360px;background:#000}
.row{display:grid;gap:12px;margin-bottom:24px}.cell h4{margin:4px 0;font-weight:normal;color:#555}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}button{font-size:18px;padding:10px 24px;margin:8px}
.wide{max-width:100%;overflow-x:auto}svg{max-width:100%;height:auto}"""


def video_uri(path: str) -> str:
    """The file's bytes inline (H.264 mp4 from sample.py plays in Chromium, Firefox and Safari)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read video {path}: {e.strerror}") from None
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_tag(path: str, attrs: str = "") -> str:
    return f'<video src="{video_uri(path)}" autoplay loop muted playsinline {attrs}></video>'


def videos_by_prompt(results: list[dict]) -> dict[str, list[list[str]]]:
    """prompt -> for each run, the paths of its videos of that prompt (file names sorted)."""
    prompts = {}
    for j, r in enumerate(results):
        for name in sorted(r["videos"]):
            prompts.setdefault(r["videos"][name]["prompt"], [[] for _ in results])[j].append(
                os.path.join(r["video_dir"], name))
    return prompts


def comparison_page(results: list[dict], table_md: str, run_dirs: list[str]) -> str:
    """The before/after page: per prompt a row per video index, a column per run; the table; the reward curves of
    the training runs in `run_dirs` (SVG)."""
    curves = {}  # first: a run folder without rewards is refused before any video is read
    for run_dir in run_dirs:
        title, series, updates = reward_curve(run_dir)
        curves[os.path.basename(os.path.normpath(run_dir))] = svg(title, series, vlines=updates)
    names = [r["name"] for r in results]
    cols = f"grid-template-columns:repeat({len(results)},minmax(0,360px))"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(' vs '.join(names))}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(' vs '.join(names))}</h1>"]
    for prompt, per_run in videos_by_prompt(results).items():
        out.append(f"<h3>{html.escape(prompt)}</h3>")
        for i in range(max(map(len, per_run))):
            cells = [f"<div class='cell'><h4>{html.escape(n)}</h4>" + (video_tag(v[i]) if i < len(v) else "-") +
                     "</div>" for n, v in zip(names, per_run)]
            out.append(f"<div class='row' style='{cols}'>" + "".join(cells) + "</div>")
    out.append("<h2>Metrics</h2><div class='wide'>" + markdown_table(table_md, transpose=True) + "</div>")
    for run, curve in curves.items():
        out.append(f"<h2>Reward curve: {html.escape(run)}</h2>{curve}")
    return "\n".join(out + ["</body></html>"]) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The blind study (paper Fig. 4)


def study_pairs(a: dict, b: dict, seed: int = 0) -> tuple[str, list[dict]]:
    """(study id, pairs): every video file name both runs have (the same prompt and sample index), shuffled, the
    side of each run drawn per pair, all from `seed`. The id is a hash of the pairs: results of another study
    (other runs, videos or seed) are told apart."""
    common = sorted(set(a["videos"]) & set(b["videos"]))
    if not common:
        raise UserError(f"{a['name']} and {b['name']} share no video file name: a study pairs the same prompt and "
                        "sample index of both runs (sample.py's {prompt}-{i}.mp4)")
    rng = random.Random(seed)
    rng.shuffle(common)
    pairs = []
    for name in common:
        runs = [(a["name"], a["video_dir"]), (b["name"], b["video_dir"])]
        if rng.random() < 0.5:
            runs.reverse()
        pairs.append({"prompt": a["videos"][name]["prompt"], "runs": [r for r, _ in runs],
                      "videos": [os.path.abspath(os.path.join(d, name)) for _, d in runs]})
    study = hashlib.sha256(json.dumps([a["name"], b["name"], pairs]).encode()).hexdigest()[:12]
    return study, pairs


STUDY_JS = """
const S = JSON.parse(document.getElementById('study').textContent);
const out = {study: S.study, runs: S.runs, judgements: []};
let k = 0;
function show() {
  const done = k >= S.pairs.length;
  document.getElementById('pair').style.display = done ? 'none' : 'block';
  document.getElementById('done').style.display = done ? 'block' : 'none';
  document.getElementById('results').value = JSON.stringify(out, null, 1);
  if (done) return;
  document.getElementById('progress').textContent = `Pair ${k + 1} of ${S.pairs.length}`;
  document.getElementById('prompt').textContent = S.pairs[k].prompt;
  for (const i of [0, 1]) document.getElementById('v' + i).src = S.uris[k][i];
}
function judge(choice) {
  const p = S.pairs[k];
  out.judgements.push({pair: k, prompt: p.prompt, videos: p.videos, runs: p.runs, choice: choice});
  k += 1;
  show();
}
function save() {
  const blob = new Blob([JSON.stringify(out, null, 1)], {type: 'application/json'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = 'study-' + S.study + '.json';
  a.click();
}
document.addEventListener('keydown', e => {
  if (k >= S.pairs.length) return;
  if (e.key === '1') judge('left'); else if (e.key === '2') judge('right'); else if (e.key === '0') judge('tie');
});
show();
"""


def study_page(a: dict, b: dict, seed: int = 0) -> str:
    study, pairs = study_pairs(a, b, seed)
    data = {"study": study, "runs": [a["name"], b["name"]], "pairs": pairs,
            "uris": [[video_uri(v) for v in p["videos"]] for p in pairs]}
    payload = json.dumps(data).replace("</", "<\\/")  # a prompt cannot close the script element
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>Video study</title><style>{STYLE}</style>
</head><body><h1>Which video is better?</h1>
<p>Judge overall quality and how well each video follows the prompt. Keys: 1, 2, or 0 for "the same".</p>
<div id="pair"><p id="progress"></p><p>Prompt: <b id="prompt"></b></p>
<div class="row" style="grid-template-columns:1fr 1fr">
<div class="cell"><h4>Video 1</h4><video id="v0" autoplay loop muted playsinline></video></div>
<div class="cell"><h4>Video 2</h4><video id="v1" autoplay loop muted playsinline></video></div></div>
<button id="left" onclick="judge('left')">Video 1 is better</button>
<button id="tie" onclick="judge('tie')">The same</button>
<button id="right" onclick="judge('right')">Video 2 is better</button></div>
<div id="done" style="display:none"><p>All pairs judged. Thank you.</p>
<button id="save" onclick="save()">Save results</button></div>
<textarea id="results" readonly style="width:100%;height:6em;margin-top:24px"></textarea>
<script type="application/json" id="study">{payload}</script>
<script>{STUDY_JS}</script></body></html>
"""


def read_study(paths: list[str]) -> dict:
    """One or more raters' saved results of ONE study, their judgements joined."""
    joined = None
    for path in paths:
        r = read_json(path, "study results")
        if "judgements" not in r:
            raise UserError(f"{path} is not the results file of an evaluate.py study (saved by its page)")
        check_fields(r, {"runs": list, "judgements": list}, f"study results {path}")
        pair = lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)  # noqa: E731
        for i, j in enumerate(r["judgements"]):
            check_fields(j, {"choice": str, "runs": list, "prompt": str, "videos": list},
                         f"study results {path}, judgement {i + 1}")
            if j["choice"] not in ("left", "right", "tie") or not pair(j["runs"]) or not pair(j["videos"]):
                raise UserError(f"study results {path}, judgement {i + 1} is damaged: its choice, runs or videos are "
                                "not those of an evaluate.py study page")
        if not pair(r["runs"]):
            raise UserError(f"{path} is not the results file of an evaluate.py study (saved by its page)")
        if joined is None:
            joined = {"study": r.get("study"), "runs": r["runs"], "judgements": [], "files": []}
        elif r.get("study") != joined["study"]:
            raise UserError(f"{path} holds results of another study ({r.get('study')}, not {joined['study']}: other "
                            "runs, videos or seed)")
        joined["judgements"] += r["judgements"]
        joined["files"].append(path)
    if not joined["judgements"]:
        raise UserError(f"{', '.join(paths)}: no judgements recorded")
    return joined


def win_rate(study: dict, resamples: int = 10000, seed: int = 0) -> dict:
    """The second run's wins, ties and losses against the first, its win rate (wins + ties / 2) / judgements, and
    a 95% bootstrap interval over the judgements (percentiles of `resamples` resamples)."""
    first, second = study["runs"]
    outcome = []  # 1 the second run won, 0.5 a tie, 0 it lost
    for j in study["judgements"]:
        if j["choice"] == "tie":
            outcome.append(0.5)
        else:
            winner = j["runs"][0 if j["choice"] == "left" else 1]
            outcome.append(1.0 if winner == second else 0.0)
    n = len(outcome)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(outcome, k=n)) / n for _ in range(resamples))
    return {"first": first, "second": second, "judgements": n, "wins": outcome.count(1.0),
            "ties": outcome.count(0.5), "losses": outcome.count(0.0), "win_rate": sum(outcome) / n,
            "ci95": [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]}


def print_study(paths: list[str]) -> dict:
    """Fig. 4: the second run against the first over every rater's judgements."""
    w = win_rate(read_study(paths))
    print(f"{w['second']} vs {w['first']}: {w['wins']} wins, {w['ties']} ties, {w['losses']} losses in "
          f"{w['judgements']} judgements; win rate {w['win_rate']:.3f} (95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}, "
          "bootstrap over judgements; a tie counts half)")
    return w


def study_manifest(study: dict) -> list[dict]:
    """agreement.py's groups from a study: each decided pair is a group of two videos with the human's
    pick as best (ties carry no choice and are left out)."""
    return [{"prompt": j["prompt"], "videos": j["videos"], "best": 0 if j["choice"] == "left" else 1}
            for j in study["judgements"] if j["choice"] != "tie"]
