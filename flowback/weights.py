"""`flowback weights fetch|verify`: the pretrained networks of the paper profiles, fetched once, checked every time.

Why: GPU clusters are often air-gapped, and a stage that silently downloads (or half-downloads) a network mid-run
is neither reproducible nor possible there. So the networks a profile needs are fetched once, on a machine with
internet, into the directories params.yaml names; the directories are copied to the cluster; and `verify` proves
there, before any stage runs, that every file is byte-identical to what was fetched and loads through the very
loaders the stages use.

Which networks a profile needs is decided from the validated params, over every experiment (overrides included):
- encoder (DINOv2 in the paper): `encoder.hub` is set and some experiment aligns (strategy != "none"); saved into
  `encoder.dir` as `config.json` + `model.safetensors`, the format flowback/alignment/encoder.py loads.
- vae: `model.latent` is set; `model.latent.hub` saved into `model.latent.vae_dir` in diffusers format (safetensors).
- inception: `metrics.network` is "inception"; torch-fidelity's weights file into `metrics.dir`.

Every fetched directory ends with `weights.json` {network, id, source, files: {name: sha256}, fetched_at}, written
last, so a directory without it is an unfinished fetch. `id` is what the params ask for (hub name and config, VAE
repo, Inception file); `source` is where the bytes came from (the hub, a URL, or a local mirror given with
`--source`), so a mirror-fetched directory still verifies against the params.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from .errors import FlowBackError
from .io import FlowBackFileError, atomic_path, load_json, save_json, sha256_file
from .params import Params

MANIFEST = "weights.json"
FETCH_HINT = "run `flowback weights fetch`"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: name-<sha256 prefix>.ext


class WeightsError(FlowBackError):
    """A network cannot be fetched, or a fetched directory does not verify; the message names the network or file."""


@dataclass(frozen=True)
class Network:
    """One network a profile needs: where it goes, what the params ask for (`id`), and where to get it (`source`)."""

    name: str  # "encoder" | "vae" | "inception"
    directory: Path
    id: Any  # JSON-able: compared with the manifest's id, so changed params mean a refetch
    source: str  # hub id, URL, or local file / directory
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # encoder: asdict(EncoderConfig); vae: scale


@dataclass(frozen=True)
class Check:
    network: str
    directory: Path
    status: str  # "ok", "missing", "stale", "hash mismatch", "load failed"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


# ------------------------------------------------------------------------------------------------- what is needed
def required_networks(params: Params, sources: dict[str, str] | None = None) -> list[Network]:
    """The networks `params` needs over all experiments, one per directory; `sources` overrides where each comes from.

    `sources` maps a network name to a local file / directory or URL to copy from instead of the hub (a mirror, or
    tests): encoder -> a safetensors/pth state dict of the `encoder.hub` architecture, vae -> a diffusers directory,
    inception -> a file path or URL.
    """
    from .alignment.encoder import EncoderConfig
    from .metrics.inception import INCEPTION_FILE, inception_url

    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(NETWORKS))
    if unknown:
        raise WeightsError(f"--source: unknown network {', '.join(unknown)}; known: {', '.join(NETWORKS)}")
    found: dict[Path, tuple[Network, str]] = {}

    def add(net: Network, why: str) -> None:
        key = Path(os.path.normpath(net.directory))
        if key in found and found[key][0] != net:
            other, other_why = found[key]
            raise WeightsError(f"{net.directory}: {other_why} wants {other.name} {other.id!r} there, {why} wants "
                               f"{net.name} {net.id!r}; give them different directories")
        found.setdefault(key, (net, why))

    for run in params.runs():
        exp = params.run(run)
        p = exp.params
        why = f"experiment {exp.name!r}"
        if exp.strategy != "none" and p.encoder.hub:
            if p.encoder.train is not None:  # the encoder stage would train over the fetched weights
                raise WeightsError(f"{why}: encoder.hub ({p.encoder.hub}) and encoder.train are both set; the "
                                   f"encoder stage would overwrite the fetched weights in {p.encoder.dir}; set "
                                   f"encoder.train: null to use the hub encoder")
            cfg = replace(EncoderConfig.of(p.encoder), arch=p.encoder.hub)
            cfg_json = _jsonable(asdict(cfg))
            add(Network("encoder", Path(p.encoder.dir), cfg_json, sources.get("encoder", p.encoder.hub),
                        {"config": cfg}), why)
        if p.model.latent is not None:
            lat = p.model.latent
            add(Network("vae", Path(lat.vae_dir), lat.hub, sources.get("vae", lat.hub), {"scale": lat.scale}), why)
        if p.metrics.network == "inception":
            add(Network("inception", Path(p.metrics.dir), f"torch-fidelity {INCEPTION_FILE}",
                        sources.get("inception", inception_url())), why)
    order = {n: i for i, n in enumerate(NETWORKS)}
    return sorted((net for net, _ in found.values()), key=lambda n: (order[n.name], str(n.directory)))


# ------------------------------------------------------------------------------------------- per-network handlers
def _rand(*shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.rand(*shape, generator=g) * 2 - 1


class EncoderWeights:
    """The alignment encoder (DINOv2): timm weights saved in FlowBack's encoder format."""

    @staticmethod
    def fetch(net: Network, progress: bool) -> list[str]:
        """timm.create_model(hub, pretrained=True) (or the local state dict in `source`), saved with save_encoder."""
        import timm

        from .alignment.encoder import CONFIG_FILE, WEIGHTS_FILE, save_encoder

        cfg = net.extra["config"]
        overlay = {"file": str(Path(net.source).resolve()), "custom_load": False} if _is_local(net.source) else None
        model = timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay=overlay, **cfg.kwargs)
        save_encoder(model, cfg, net.directory)
        return [CONFIG_FILE, WEIGHTS_FILE]

    @staticmethod
    def load_and_run(net: Network) -> str:
        from .alignment.encoder import load_encoder

        enc = load_encoder(net.directory, allow_hub=False)
        s = enc.cfg.input_size
        out = enc(_rand(2, enc.in_chans, s, s))
        if out.shape[0] != 2 or out.shape[-1] != enc.dim or not torch.isfinite(out).all():
            raise ValueError(f"forward gave {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())})")
        return f"{enc.cfg.arch}, {tuple(out.shape[1:])} patch features"


class VaeWeights:
    """The latent profiles' VAE: a diffusers AutoencoderKL saved as safetensors."""

    @staticmethod
    def fetch(net: Network, progress: bool) -> list[str]:
        from .models.vae import load_pretrained_vae, save_vae

        return save_vae(load_pretrained_vae(net.source), net.directory)

    @staticmethod
    def load_and_run(net: Network) -> str:
        from .models.vae import LatentCodec, load_vae

        codec = LatentCodec(load_vae(net.directory), scale=net.extra.get("scale", 0.18215))
        s = 4 * codec.factor
        x = _rand(1, codec.vae.config.in_channels, s, s)
        z = codec.encode(x)
        y = codec.decode(z)
        want = (1, codec.latent_channels, 4, 4)
        if tuple(z.shape) != want or y.shape != x.shape or not (torch.isfinite(z).all() and torch.isfinite(y).all()):
            raise ValueError(f"encode/decode gave {tuple(z.shape)} / {tuple(y.shape)}, expected {want} / "
                             f"{tuple(x.shape)}, finite")
        return f"AutoencoderKL, {codec.latent_channels} x 1/{codec.factor} latents"


class InceptionWeights:
    """The ADM suite's Inception-v3: torch-fidelity's weights file, sha256-checked against the prefix in its name."""

    @staticmethod
    def fetch(net: Network, progress: bool) -> list[str]:
        from .metrics.inception import INCEPTION_FILE

        dest = net.directory / INCEPTION_FILE
        with atomic_path(dest) as tmp:
            if _is_local(net.source):
                shutil.copyfile(net.source, tmp)
            else:
                torch.hub.download_url_to_file(net.source, str(tmp), progress=progress)
            m = _HASH_IN_NAME.search(Path(urlparse(net.source).path).name)
            if m and not sha256_file(tmp).startswith(m.group(1)):
                raise WeightsError(f"inception: {net.source}: sha256 {sha256_file(tmp)[:16]}... does not start with "
                                   f"{m.group(1)}, the prefix its name promises (damaged download, or another file)")
        return [INCEPTION_FILE]

    @staticmethod
    def load_and_run(net: Network) -> str:
        from .metrics.generative import load_feature_network
        from .metrics.inception import FEATURE_DIMS

        feats = load_feature_network("inception", net.directory).features(_rand(1, 3, 32, 32, dtype=torch.uint8))
        shapes = {k: tuple(v.shape) for k, v in feats.items()}
        if shapes != {k: (1, d) for k, d in FEATURE_DIMS.items()} or not all(
                torch.isfinite(v).all() for v in feats.values()):
            raise ValueError(f"features {shapes}, expected {FEATURE_DIMS} per image, finite")
        return "Inception-v3 (pool 2048, logits 1008, spatial 2023)"


HANDLERS = {"encoder": EncoderWeights, "vae": VaeWeights, "inception": InceptionWeights}
NETWORKS = tuple(HANDLERS)


def _load_and_run(net: Network) -> str:
    """Load `net` through the loader its stages use and run a tiny forward; returns a short description."""
    return HANDLERS[net.name].load_and_run(net)


# ------------------------------------------------------------------------------------------------------- verifying
def check_hashes(net: Network) -> Check | None:
    """None when `net.directory` holds exactly the files its manifest lists, for the id the params ask for."""
    d, fix = net.directory, FETCH_HINT
    if not d.is_dir():
        return Check(net.name, d, "missing", f"{d}: {net.name} directory not found; {fix}")
    manifest_path = d / MANIFEST
    if not manifest_path.exists():
        return Check(net.name, d, "missing", f"{manifest_path}: not found (no fetch, or an unfinished one); {fix}")
    try:
        manifest = load_json(manifest_path)
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise KeyError("files")
    except (FlowBackFileError, KeyError, TypeError) as e:
        return Check(net.name, d, "missing", f"{manifest_path}: not a weights manifest ({e}); {fix}")
    if manifest.get("network") != net.name or manifest.get("id") != _jsonable(net.id):
        return Check(net.name, d, "stale", f"{manifest_path}: holds {manifest.get('network')} "
                                           f"{manifest.get('id')!r}, params ask for {net.name} {net.id!r}; {fix}")
    for name, digest in sorted(files.items()):
        path = d / name
        if not path.is_file():
            return Check(net.name, d, "missing", f"{path}: file not found; {fix}")
        if sha256_file(path) != digest:
            return Check(net.name, d, "hash mismatch",
                         f"{path}: sha256 differs from {MANIFEST} (changed or damaged since the fetch); {fix}")
    return None


def verify_network(net: Network) -> Check:
    """Hashes against the manifest, then the real loader and a tiny forward."""
    bad = check_hashes(net)
    if bad is not None:
        return bad
    try:
        what = _load_and_run(net)
    except Exception as e:  # the loaders raise FlowBackFileError; a forward can raise anything
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Check(net.name, net.directory, "load failed", f"{net.directory}: {net.name} does not load and run "
                                                              f"({type(e).__name__}: {msg}); {FETCH_HINT}")
    return Check(net.name, net.directory, "ok", what)


def print_table(checks: list[Check], out: Callable[[str], None] = print) -> None:
    width = max([len("directory")] + [len(str(c.directory)) for c in checks])
    out(f"{'network':<10} {'directory':<{width}}  status")
    for c in checks:
        out(f"{c.network:<10} {str(c.directory):<{width}}  {c.status}")


def verify(params: Params, out: Callable[[str], None] = print) -> list[Check]:
    """Verify every network `params` needs and print a table; WeightsError (the first failure) unless all pass."""
    networks = required_networks(params)
    if not networks:
        out("weights: these params need no pretrained weights (their networks are trained by the pipeline)")
        return []
    checks = [verify_network(net) for net in networks]
    print_table(checks, out)
    failed = [c for c in checks if not c.ok]
    if failed:
        more = f" (and {len(failed) - 1} more failing, see the table)" if len(failed) > 1 else ""
        raise WeightsError(f"{failed[0].error}{more}")
    return checks


# -------------------------------------------------------------------------------------------------------- fetching
def _is_local(source: str) -> bool:
    return Path(source).exists()


def fetch_network(net: Network, out: Callable[[str], None] = print, progress: bool = True) -> Check:
    """Fetch one network unless its directory already verifies; write the manifest last; return its check."""
    current = verify_network(net)
    if current.ok:
        out(f"{net.name}: {net.directory} already verifies; skipped")
        return current
    out(f"{net.name}: fetching {net.source} into {net.directory} ({current.status})")
    (net.directory / MANIFEST).unlink(missing_ok=True)  # from here on the directory is an unfinished fetch
    net.directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        files = HANDLERS[net.name].fetch(net, progress)
    except WeightsError:
        raise
    except Exception as e:  # hub, HTTP and file errors all differ; the message says which network and source
        msg = str(e).splitlines()[0] if str(e) else ""
        raise WeightsError(f"{net.name}: cannot fetch {net.source!r} ({type(e).__name__}: {msg}); check the "
                           f"connection (or run where there is internet and copy {net.directory})") from e
    try:
        what = _load_and_run(net)
    except Exception as e:
        raise WeightsError(f"{net.name}: fetched {net.source!r} into {net.directory}, but it does not load and run "
                           f"({type(e).__name__}: {e})") from e
    hashes = {name: sha256_file(net.directory / name) for name in files}
    save_json(net.directory / MANIFEST, {
        "network": net.name, "id": net.id, "source": net.source, "files": hashes,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    size = sum((net.directory / n).stat().st_size for n in files) / 2**20
    out(f"{net.name}: done, {len(files)} files, {size:.1f} MiB, {time.perf_counter() - t0:.0f} s: {what}")
    return Check(net.name, net.directory, "ok", what)


def fetch(params: Params, sources: dict[str, str] | None = None, out: Callable[[str], None] = print,
          progress: bool = True) -> list[Check]:
    """Fetch every network `params` needs (skipping directories that already verify), then print the table."""
    networks = required_networks(params, sources)
    if not networks:
        out("weights: these params need no pretrained weights (their networks are trained by the pipeline)")
        return []
    checks = [fetch_network(net, out, progress) for net in networks]
    print_table(checks, out)
    return checks
