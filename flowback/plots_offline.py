"""`dvc plots show` that renders without a network: `python -m flowback plots [dvc plots show options]`.

DVC's page loads vega, vega-lite and vega-embed from a CDN, so its curves stay blank offline (its image plots, PNG
files beside the page, show either way). This runs the same command with `--html-template` set to a page that holds
those libraries inline, as the vl-convert-python package ships them (`vl_convert.javascript_bundle`, the newest
vega-lite 5 it has: DVC's specs are vega-lite 5). Nothing is fetched, at install or at run time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(".dvc/tmp/plots_offline.html")  # DVC's own scratch directory: not in git
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">
    (function () {
@BUNDLE@
    })();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>"""


def bundle() -> str:
    """vega, vega-lite 5 and vega-embed as one classic script that sets window.vegaEmbed (what DVC's plots call)."""
    import vl_convert

    newest = max((v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")),
                  key=lambda v: tuple(int(x) for x in v.split(".")))
    js = vl_convert.javascript_bundle(vl_version=newest)
    if "</script" in js.lower():  # would end the inline script early
        raise RuntimeError("vl-convert's bundle holds '</script': it cannot be inlined")
    return js


def write_template(path: Path = TEMPLATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.replace("@BUNDLE@", bundle()), encoding="utf-8")
    return path


def main(args: list[str]) -> int:
    """`dvc plots show ARGS` with the offline page (run in the repository root, where DVC's .dvc/ is)."""
    if not Path(".dvc").is_dir():
        print("flowback plots: run it in the repository root (no .dvc/ here)", file=sys.stderr)
        return 2
    template = write_template()
    return subprocess.call([sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), *args])
