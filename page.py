"""Pages to look at and judge videos, written by evaluate.py: one self-contained HTML file each (videos inlined as
data URIs, no server, no network, no script from elsewhere).

    python evaluate.py --compare before/evaluation.json after/evaluation.json --html page.html --run runs/vpo
    python evaluate.py --compare before/evaluation.json after/evaluation.json --study-html study.html
    python evaluate.py --study rater1.json rater2.json          # win rate with a 95% confidence interval

- The comparison page: for each prompt, the videos of every compared run side by side (before / after), then the
  metric table and the reward curves of the training runs.
- The study (paper Fig. 4): pairs of videos of one prompt, one from each of two runs, in a random order and on
  random sides, labelled "Video 1" / "Video 2". One click records a judgement and shows the next pair; the
  judgements are saved as JSON (a download), which `--study` turns into a win rate and `reward.py agreement`
  into a reward/human agreement (Table 2). The page's source holds which run is which: raters should only click.
"""
import base64
import hashlib
import html
import json
import os
import random

from inputs import UserError, read_text

STYLE = """body{font-family:sans-serif;margin:24px;color:#222}video{width:100%;max-width:360px;background:#000}
.row{display:grid;gap:12px;margin-bottom:24px}.cell h4{margin:4px 0;font-weight:normal;color:#555}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}button{font-size:18px;padding:10px 24px;margin:8px}"""


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


def markdown_table(md: str) -> str:
    """evaluate.table's markdown -> an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.strip() and not set(line.strip()) <= set("|-: ")]
    head, body = rows[0], rows[1:]
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")


def videos_by_prompt(results: list[dict]) -> dict[str, list[list[str]]]:
    """prompt -> for each run, the paths of its videos of that prompt (file names sorted)."""
    prompts = {}
    for j, r in enumerate(results):
        for name in sorted(r["videos"]):
            prompts.setdefault(r["videos"][name]["prompt"], [[] for _ in results])[j].append(
                os.path.join(r["video_dir"], name))
    return prompts


def comparison_page(results: list[dict], table_md: str, curves: dict[str, str]) -> str:
    """The before/after page: per prompt a row per video index, a column per run; the table; the curves (SVG)."""
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
    out.append("<h2>Metrics</h2>" + markdown_table(table_md))
    for run, svg in curves.items():
        out.append(f"<h2>Reward curve: {html.escape(run)}</h2>{svg}")
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
        try:
            r = json.loads(read_text(path, "study results"))
        except json.JSONDecodeError as e:
            raise UserError(f"cannot read study results {path}: {e}") from None
        ok = isinstance(r, dict) and isinstance(r.get("judgements"), list) and isinstance(r.get("runs"), list)
        if not ok or len(r["runs"]) != 2 or not all(isinstance(j, dict) and j.get("choice") in ("left", "right", "tie")
                                                    and len(j.get("runs", [])) == 2 for j in r["judgements"]):
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


def study_manifest(study: dict) -> list[dict]:
    """reward.py agreement's groups from a study: each decided pair is a group of two videos with the human's
    pick as best (ties carry no choice and are left out)."""
    return [{"prompt": j["prompt"], "videos": j["videos"], "best": 0 if j["choice"] == "left" else 1}
            for j in study["judgements"] if j["choice"] != "tie"]
