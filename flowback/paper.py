"""The numbers the papers report, as data: what FlowBack's tables are set beside. The R-REPA paper (arXiv 2511.22345v2)
gives Tables 1-4 and 7-9; STARFlow (arXiv 2506.06276) the `starflow` table; Adversarial Flow Models (arXiv
2511.22475) the `af256` table.

An experiment names the row it reproduces with `paper: <table>/<row>` in params.yaml; the `table` stage then puts
the paper's value beside ours. Values are transcribed from the paper's own tables (docs/recipes.md says where each
table's protocol comes from); None = not reported. Nothing here is computed.
"""

from __future__ import annotations

METRICS = ("fid", "sfid", "is", "acc")
FID4096 = "FID-4096 (4,096 samples), each model at its best classifier-free guidance scale from a grid"

TABLES: dict[str, dict] = {
    "ablation": {  # R-REPA Table 1; "Layers" is 2 in groups 1-2, then 2 / 4 / 6 in group 3
        "title": f"R-REPA Table 1: alignment strategy, blocks and layer (ImageNet 64x64, 400K iterations; {FID4096})",
        "rows": {
            "baseline": {"label": "TARFlow baseline", "fid": 12.91, "sfid": 33.79, "is": 36.62, "acc": 37.43},
            "forward_all": {"label": "Forward, all blocks, L2", "fid": 12.25, "sfid": 37.97, "is": 40.85, "acc": 46.97},
            "detach_all": {"label": "Detach, all blocks, L2", "fid": 12.19, "sfid": 34.31, "is": 41.98, "acc": 49.06},
            "reverse_all": {"label": "Reverse, all blocks, L2", "fid": 12.21, "sfid": 33.80, "is": 42.08, "acc": 49.91},
            "forward_12": {"label": "Forward, block 1&2, L2", "fid": 12.67, "sfid": 39.99, "is": 41.11, "acc": 61.16},
            "detach_12": {"label": "Detach, block 1&2, L2", "fid": 12.73, "sfid": 33.84, "is": 37.81, "acc": 61.63},
            "detach_78": {"label": "Detach, block 7&8, L2", "fid": 12.12, "sfid": 34.00, "is": 41.18, "acc": 55.14},
            "reverse_78": {"label": "Reverse, block 7&8, L2", "fid": 11.93, "sfid": 33.78, "is": 40.90, "acc": 55.21},
            "reverse_78_l4": {"label": "Reverse, block 7&8, L4", "fid": 11.84, "sfid": 33.61, "is": 46.06,
                              "acc": 58.91},
            "reverse_78_l6": {"label": "Reverse, block 7&8, L6", "fid": 11.71, "sfid": 33.68, "is": 44.31,
                              "acc": 57.35},
        },
    },
    "detach_layers": {  # Table 7 (its L2 Acc. reads 49.00 where Table 1's identical row reads 49.06)
        "title": f"R-REPA Table 7: Detach on all blocks, by layer (ImageNet 64x64, 400K; {FID4096})",
        "rows": {
            "detach_all_l2": {"label": "Detach, all blocks, L2", "fid": 12.19, "sfid": 34.31, "acc": 49.00},
            "detach_all_l4": {"label": "Detach, all blocks, L4", "fid": 12.14, "sfid": 33.97, "acc": 54.14},
            "detach_all_l6": {"label": "Detach, all blocks, L6", "fid": 12.37, "sfid": 34.32, "acc": 54.98},
        },
    },
    "encoders": {  # Table 8: R-REPA at layer 6 of blocks 7&8, the encoder swapped
        "title": f"R-REPA Table 8: the alignment encoder (Reverse 7&8 L6, ImageNet 64x64, 400K; {FID4096})",
        "rows": {
            "clip_b": {"label": "CLIP-B", "fid": 12.41, "sfid": 33.99, "is": 41.99, "acc": 38.99},
            "mae_b": {"label": "MAE-B", "fid": 12.32, "sfid": 34.00, "is": 39.69, "acc": 37.57},
            "dinov2_b": {"label": "DINOv2-B", "fid": 11.71, "sfid": 33.68, "is": 44.31, "acc": 57.35},
            "dinov2_l": {"label": "DINOv2-L", "fid": 11.74, "sfid": 33.87, "is": 45.00, "acc": 58.80},
        },
    },
    "efficiency": {  # Table 2; the 400K-800K R-REPA rows are checkpoints of the 1M run (its caption)
        "title": f"R-REPA Table 2: training progress ({FID4096})",
        "rows": {
            "tarflow_64_1m": {"label": "TARFlow, 64 px, 1M", "fid": 11.76, "acc": 39.97},
            "rrepa_64_400k": {"label": "+R-REPA, 64 px, 400K", "fid": 11.71, "acc": 57.76},
            "rrepa_64_600k": {"label": "+R-REPA, 64 px, 600K", "fid": 11.53, "acc": 57.75},
            "rrepa_64_800k": {"label": "+R-REPA, 64 px, 800K", "fid": 11.48, "acc": 57.65},
            "rrepa_64_1m": {"label": "+R-REPA, 64 px, 1M", "fid": 11.25, "acc": 57.02},
            "latent_256_400k": {"label": "Latent-TARFlow, 256 px, 400K", "fid": 13.82, "acc": 45.97},
            "latent_256_1m": {"label": "Latent-TARFlow, 256 px, 1M", "fid": 13.05, "acc": 40.22},
            "rrepa_256_400k": {"label": "+R-REPA, 256 px, 400K", "fid": 13.26, "acc": 57.85},
            "rrepa_256_1m": {"label": "+R-REPA, 256 px, 1M", "fid": 12.79, "acc": 56.24},
        },
    },
    "lambda": {  # Table 9: lambda 0 and 0.1 are Table 2's 256 px 400K rows
        "title": f"R-REPA Table 9: the alignment weight lambda (ImageNet 256x256, 400K; {FID4096})",
        "rows": {
            "lambda_0": {"label": "lambda 0 (Latent-TARFlow)", "fid": 13.82},
            "lambda_0.1": {"label": "lambda 0.1", "fid": 13.26},
            "lambda_0.5": {"label": "lambda 0.5", "fid": 13.74},
        },
    },
    "main64": {  # Table 3 (FID and sFID only)
        "title": "R-REPA Table 3: ImageNet 64x64, 50K samples, guided (the scale is not given), sampling + denoising",
        "rows": {
            "tarflow": {"label": "TARFlow (their released code)", "fid": 4.21, "sfid": 5.34},
            "rrepa": {"label": "+R-REPA", "fid": 3.69, "sfid": 4.34},
        },
    },
    "main256": {  # Table 4
        "title": "R-REPA Table 4: ImageNet 256x256, 50K samples, guided (the scale is not given)",
        "rows": {
            "latent_tarflow": {"label": "Latent-TARFlow", "fid": 5.15, "sfid": 6.78, "is": 243.49},
            "rrepa": {"label": "+R-REPA (patch 2)", "fid": 4.95, "sfid": 6.89, "is": 234.99},
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
