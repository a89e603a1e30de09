"""The numbers the papers report, as data: what FlowBack's tables are compared against. The R-REPA paper (arXiv
2511.22345) gives the ablation, efficiency and main-results tables; STARFlow (arXiv 2506.06276) the `starflow` table.

An experiment names the row it reproduces with `paper: <table>/<row>` in params.yaml; the `table` stage then puts
the paper's value beside ours and the difference. Values are transcribed from the paper's tables (see
`../shared/docs/paper-notes.md`); None = not reported. Nothing here is computed.
"""

from __future__ import annotations

METRICS = ("fid", "sfid", "is", "acc")

TABLES: dict[str, dict] = {
    "ablation": {
        "title": "Ablation: alignment strategy and position (ImageNet 64x64, 400K iterations, no guidance)",
        "rows": {
            "baseline": {"label": "TARFlow baseline", "fid": 12.91, "sfid": 33.79, "is": 36.62, "acc": 37.43},
            "forward_all": {"label": "Forward, all blocks", "fid": 12.25, "sfid": 37.97, "is": 40.85, "acc": 46.97},
            "detach_all": {"label": "Detach, all blocks", "fid": 12.19, "sfid": 34.31, "is": 41.98, "acc": 49.06},
            "reverse_all": {"label": "Reverse, all blocks", "fid": 12.21, "sfid": 33.80, "is": 42.08, "acc": 49.91},
            "forward_12": {"label": "Forward, block 1&2", "fid": 12.67, "sfid": 39.99, "is": 41.11, "acc": 61.16},
            "detach_78": {"label": "Detach, block 7&8", "fid": 12.12, "sfid": 34.00, "is": 41.18, "acc": 55.14},
            "reverse_78": {"label": "Reverse, block 7&8", "fid": 11.93, "sfid": 33.78, "is": 40.90, "acc": 55.21},
            "reverse_78_l6": {"label": "Reverse, block 7&8, L6", "fid": 11.71, "sfid": 33.68, "is": 44.31,
                              "acc": 57.35},
        },
    },
    "efficiency": {
        "title": "Training efficiency (no guidance)",
        "rows": {
            "tarflow_64_1m": {"label": "TARFlow, 64 px, 1M", "fid": 11.76, "acc": 39.97},
            "rrepa_64_400k": {"label": "+R-REPA, 64 px, 400K", "fid": 11.71, "acc": 57.76},
            "rrepa_64_1m": {"label": "+R-REPA, 64 px, 1M", "fid": 11.25, "acc": 57.02},
            "latent_256_1m": {"label": "Latent-TARFlow, 256 px, 1M", "fid": 13.05, "acc": 40.22},
            "rrepa_256_1m": {"label": "+R-REPA, 256 px, 1M", "fid": 12.79, "acc": 56.24},
        },
    },
    "main64": {
        "title": "Main results, ImageNet 64x64 (with guidance; sampling + denoising)",
        "rows": {
            "tarflow": {"label": "TARFlow", "fid": 4.21, "sfid": 5.34},
            "rrepa": {"label": "+R-REPA", "fid": 3.69, "sfid": 4.34},
        },
    },
    "main256": {
        "title": "Main results, ImageNet 256x256 (with guidance)",
        "rows": {
            "latent_tarflow": {"label": "Latent-TARFlow", "fid": 5.15, "sfid": 6.78, "is": 243.49},
            "rrepa_patch1": {"label": "+R-REPA + Patch1", "fid": 4.18, "sfid": 4.96, "is": 240.8},
        },
    },
    # STARFlow's Table 1 (class-conditional ImageNet 256x256, FID-50K): its 1.4B model, d(N) = 18(6), width 2048,
    # with its guidance. The table gives FID only, and no unguided FID for STARFlow. The table is an image in the
    # copies we could read; 2.40 is as the first author's slides (jiataogu.me, "STARFlow (1.4B) 2.40") and a
    # third-party copy of Table 1 (SRC-Flow's comparison: gFID with CFG 2.40, without CFG "-") both quote it.
    "starflow": {
        "title": "STARFlow (arXiv 2506.06276), class-conditional ImageNet 256x256, FID-50K (with guidance)",
        "rows": {
            "starflow_guided": {"label": "STARFlow 1.4B, deep-shallow 18(6), guided", "fid": 2.40},
        },
    },
    "af256": {
        "title": "Adversarial Flow Models (arXiv 2511.22475), ImageNet 256x256, 1 NFE, no guidance. The paper's own "
                 "table could not be read here: these numbers are those published with the released checkpoints "
                 "(see docs/af-recipe.md); check them against the paper before citing",
        "rows": {
            "b2": {"label": "AF-B/2, 1 NFE", "fid": 6.07, "is": 169.51},
            "xl2": {"label": "AF-XL/2, 1 NFE", "fid": 3.98, "is": 201.85},
        },
    },
}


def row(key: str) -> dict:
    """'ablation/reverse_78' -> its row; KeyError naming the known keys."""
    table, _, name = key.partition("/")
    if table not in TABLES or name not in TABLES[table]["rows"]:
        known = ", ".join(f"{t}/{r}" for t, spec in TABLES.items() for r in spec["rows"])
        raise KeyError(f"no paper row {key!r}; known: {known}")
    return TABLES[table]["rows"][name]
