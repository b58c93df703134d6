"""The report page: one self-contained HTML file (inline CSS and SVG; no scripts, no network)."""

from __future__ import annotations

import datetime
import math

from aqgov.errors import ReportError
from aqgov.report import _plots as plots
from aqgov.report._data import ReportData

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>aqgov audit report: run {{ d.description.run_id }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; padding-top: .6em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } code, .mono { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.ok { color: #146c2e; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.banner { padding: .6em 1em; border-radius: 4px; margin: .6em 0; }
.banner.ok { background: #e6f4ea; } .banner.fail { background: #fde7e9; }
figure { margin: .5em 0 1.2em; } figure svg { max-width: 100%; height: auto; }
.muted { color: #666; }
</style>
</head>
<body>
<h1>aqgov audit report</h1>
<p class="muted">run <code>{{ d.description.run_id }}</code>, {{ d.run_dir }}; generated {{ generated }}</p>

<section id="verification">
<h2>Verification</h2>
{% if v.report %}
<div class="banner ok">VERIFIED: {{ v.report.size }} records, {{ v.report.heads }} signed heads,
{{ "closed" if v.report.closed else "open (" ~ v.report.unsigned ~ " unsigned record(s) after the last head)" }}</div>
<table>
<tr><th>Merkle root</th><td class="mono">{{ v.report.root }}</td></tr>
<tr><th>run key (signer)</th><td class="mono">{{ v.report.signer }}: {{ s.signer }}</td></tr>
{% if v.report.witnessed %}<tr><th>cosigned by witnesses</th><td>{{ v.report.witnessed | join(", ") }}</td></tr>{% endif %}
</table>
<details><summary>{{ v.report.checked | length }} checks passed{% if v.report.unchecked %}, {{ v.report.unchecked | length }} not checked{% endif %}</summary>
<ul>{% for c in v.report.checked %}<li>{{ c }}</li>{% endfor %}
{% for u in v.report.unchecked %}<li class="fail">not checked: {{ u }}</li>{% endfor %}</ul></details>
{% else %}
<div class="banner fail">VERIFICATION FAILED: {{ v.error }}</div>
<p>Everything below is read from the log's signed part as it stands; do not rely on it until the run verifies.</p>
{% endif %}
<h3>Trusted keys</h3>
<table><tr><th>name</th><th>key id</th><th>roles</th></tr>
{% for name, kid, roles in v.keys %}<tr><td>{{ name }}</td><td class="mono">{{ kid }}</td><td>{{ roles }}</td></tr>{% endfor %}
</table>
<h3>Documents the run relied on</h3>
<table><tr><th>kind</th><th>id</th><th>file</th></tr>
{% for kind in ("policies", "profiles", "manifests") %}{% for ref in s[kind] %}
<tr><td>{{ kind }}</td><td class="mono">{{ ref.id }}</td><td class="mono">{{ ref.file }}</td></tr>{% endfor %}{% endfor %}
</table>
</section>

<section id="run">
<h2>Run</h2>
<table>
<tr><th>task</th><td><code>{{ s.config.task }}</code></td></tr>
<tr><th>status</th><td>{{ (desc.status or "closed") if desc.closed else "open (not closed)" }}</td></tr>
<tr><th>steps</th><td>{{ desc.steps }} effective, last step {{ desc.last_step }}{% if desc.last_loss is not none %}, last loss {{ "%.5g" | format(desc.last_loss) }}{% endif %}</td></tr>
<tr><th>examples</th><td>{{ desc.examples }} distinct</td></tr>
<tr><th>records</th><td>{{ desc.size }} ({% for k, n in desc.kinds | dictsort %}{{ k }}: {{ n }}{% if not loop.last %}, {% endif %}{% endfor %})</td></tr>
<tr><th>groups</th><td>{{ s.groups | join(", ") }}</td></tr>
{% if s.parent %}<tr><th>parent run</th><td class="mono">{{ s.parent.run_id }} @ {{ s.parent.size }}</td></tr>{% endif %}
</table>
<figure id="plot-loss">{{ plots.loss }}</figure>
</section>

<section id="routing">
<h2>Routing: route class x group weights</h2>
<p>Weight each route class had in each group in the signed steps (examples trained in brackets); "unseen"
cells (hatched) are groups with <code>visible = "routed"</code> that the class's examples did not see in
the forward pass; grey cells are classes no example took.</p>
<figure id="plot-heatmap">{{ plots.heatmap }}</figure>
<h3>Reach and contribution per group</h3>
<table><tr><th>group</th><th>examples reached (step x example)</th><th>sum of contribution norms</th></tr>
{% for g in s.groups %}<tr><td>{{ g }}</td><td>{{ desc.group_reach[g] }}</td><td>{{ "%.6g" | format(desc.group_norm[g]) }}</td></tr>{% endfor %}
</table>
<figure id="plot-reach">{{ plots.reach }}</figure>
<figure id="plot-contribution">{{ plots.contribution }}</figure>
</section>

<section id="entropy">
<h2>Entropy per group</h2>
{% if plots.entropy %}
{% for key, svg in plots.entropy %}<figure class="plot-entropy" id="plot-entropy-{{ loop.index }}">{{ svg }}</figure>{% endfor %}
{% else %}<p>No entropy measurements were recorded (the run has no entropy profile).</p>{% endif %}
<h3>Governance events ({{ d.events | length }})</h3>
{% if d.events %}<table><tr><th>step</th><th>group</th><th>metric</th><th>head</th><th>value</th><th>bound</th><th>limit</th><th>action</th></tr>
{% for e in d.events %}<tr><td>{{ e.step }}</td><td>{{ e.group }}</td><td>{{ e.metric }}</td><td>{{ "" if e.head is none else e.head }}</td>
<td>{{ "%.4g" | format(e.value) }}</td><td>{{ e.bound }}</td><td>{{ "%.4g" | format(e.limit) }}</td><td>{{ e.action }}{% if e.window %} (steps {{ e.window[0] }}-{{ e.window[1] }}){% endif %}</td></tr>{% endfor %}
</table>{% else %}<p>No measurement left its bounds.</p>{% endif %}
{% for x in d.escalations %}<div class="banner fail">escalation at step {{ x.step }}: <pre>{{ x.message }}</pre></div>{% endfor %}
</section>

<section id="admission">
<h2>Admission refusals ({{ d.refusals | length }})</h2>
{% if d.refusals %}<table><tr><th>step</th><th>example</th><th>reason</th></tr>
{% for r in d.refusals %}<tr><td>{{ r.step }}</td><td class="mono">{{ r.example_id }}</td><td>{{ r.reason }}</td></tr>{% endfor %}
</table>{% else %}<p>The lineage records no refused example.</p>{% endif %}
</section>

<section id="checkpoints">
<h2>Checkpoints ({{ desc.checkpoints | length }})</h2>
<table><tr><th>step</th><th>path</th><th>params SHA-256</th><th>item digests</th><th>files SHA-256</th><th>log position</th></tr>
{% for c in desc.checkpoints %}<tr><td>{{ c.step }}</td><td class="mono">{{ c.path }}</td><td class="mono">{{ c.params_sha256 }}</td>
<td class="mono">{% for k, h in (c.digests or {}) | dictsort %}{{ k }}: {{ h }}<br>{% endfor %}</td>
<td class="mono">{{ c.files_sha256 or "" }}</td><td>record {{ c.index }}, size {{ c.lineage_size }}</td></tr>{% endfor %}
</table>
</section>

<section id="attestation">
<h2>Attestation</h2>
{% if a %}<table>
<tr><th>file</th><td class="mono">{{ a.path }}</td></tr>
<tr><th>SHA-256</th><td class="mono">{{ a.sha256 }}</td></tr>
{% if a.statement %}<tr><th>signature</th><td class="ok">signed by a trusted key</td></tr>
<tr><th>subjects</th><td class="mono">{% for sub in a.statement.subject %}{{ sub.name }}: {{ sub.digest.sha256 }}<br>{% endfor %}</td></tr>
{% else %}<tr><th>signature</th><td class="fail">{{ a.error }}</td></tr>{% endif %}
</table>{% else %}<p>No attestation was given (<code>aqgov lineage export RUN --intoto FILE</code>, then
<code>aqgov report --attestation FILE</code>).</p>{% endif %}
</section>
</body>
</html>
"""


def _finite_or_none(x: float | None) -> float | None:
  return None if x is None or not math.isfinite(x) else x


def render(d: ReportData) -> str:
  """The report page for `d` as one HTML string."""
  try:
    import jinja2
  except ImportError:
    raise ReportError(
      "the audit report needs jinja2 and matplotlib; install them with pip install 'aqgov[report]'"
    ) from None
  groups = tuple(d.description.start["groups"])
  by_key = {}
  for b in d.bounds:
    by_key.setdefault(f"{b.metric}/{b.group}", []).append(b)
  svgs = {
    "loss": plots.loss(d.series),
    "heatmap": plots.heatmap(d.table),
    "reach": plots.per_group(d.series, groups, "reach"),
    "contribution": plots.per_group(d.series, groups, "contribution"),
    "entropy": [
      (k, plots.entropy(d.series, k, by_key.get(k, []), list(d.events)))
      for k in d.series.measurements
    ],
  }
  env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
  page = env.from_string(_TEMPLATE)
  return page.render(
    d=d,
    v=d.verification,
    desc=d.description._replace(last_loss=_finite_or_none(d.description.last_loss)),
    s=d.description.start,
    a=d.attestation,
    plots=_markup(svgs),
    generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
  )


def _markup(svgs: dict) -> dict:
  """The SVGs marked safe: matplotlib wrote them, no user text goes in unescaped."""
  from markupsafe import Markup

  return {
    k: [(key, Markup(s)) for key, s in v] if k == "entropy" else Markup(v) for k, v in svgs.items()
  }
