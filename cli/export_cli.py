"""samf-export: merged checkpoint -> bundle (ONNX encoders, GGUF LLM, quantized GGUF, TensorRT plans).

The commands' knobs are the fields of the export's config dataclasses (:mod:`samf.export.configs`), made into
options by :func:`~samf.cli.common.config_options`, so each default is written once, there."""

from __future__ import annotations

import dataclasses
import os

import click

from samf.export.configs import BundleConfig, EngineBuildConfig, GgufConfig, SyntheticConfig, VariantCheck

from .common import OutDir, SamfGroup, config_from, config_options


def _quant_types(ctx, param, value):
    """llama.cpp quant types, checked when the options are read: an unknown one refused before minutes of export
    (it used to fail after the ONNX export and the base GGUF were written). Case is forgiven; repeats dropped.
    None (not given) stays None, so the dataclass's default applies."""
    from samf.export.gguf_convert import FTYPES

    if value is None:
        return None
    known = {k.upper(): k for k in FTYPES}
    given = (value,) if isinstance(value, str) else tuple(value)
    out = []
    for v in given:
        k = known.get(v.strip().upper())
        if k is None:
            raise click.BadParameter(f"{v!r} is not a quant type this export makes; one of {', '.join(FTYPES)}")
        out.append(k)
    out = list(dict.fromkeys(out))
    return out[0] if isinstance(value, str) else tuple(out)


#: What the quant-type options read their values with.
QUANT_CHECK = dict(callback=_quant_types)


@click.group(cls=SamfGroup)
def main():
    """Export a trained SAMF model for the runtime."""


@main.command("bundle")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=OutDir())
@config_options(BundleConfig, quants=QUANT_CHECK)
@config_options(VariantCheck)
def bundle(checkpoint, out_dir, **given):
    """Export CHECKPOINT (RUN/merged) into a verified bundle directory."""
    from samf.export.bundle_writer import write_bundle

    cfg, check = config_from(BundleConfig, given), config_from(VariantCheck, given)
    m = write_bundle(checkpoint, out_dir, quants=cfg.quants, keep_unquantized=cfg.base, check=check, log=click.echo)
    size = sum(f["size"] for f in m["files"].values())
    click.echo(f"bundle: {out_dir} ({len(m['files'])} files, {size / 1e6:.1f} MB)")


@main.command("synthetic-bundle")
@config_options(SyntheticConfig, quants=QUANT_CHECK)
@config_options(VariantCheck, only=("precisions",), precisions=dict(
    help="encoder precisions made besides fp32 (checked on the embeddings of 2 phantoms); repeatable"))
@click.option("--out", "out_dir", required=True, type=OutDir())
def synthetic_bundle(out_dir, **given):
    """A bundle of random weights at the real shapes, to measure speed before there are trained weights.

    Its reports are gibberish; `samf bench --bundle OUT` measures latency and throughput on phantoms."""
    from samf.export.synthetic import write_synthetic_bundle

    cfg, check = config_from(SyntheticConfig, given), config_from(VariantCheck, given)
    m = write_synthetic_bundle(out_dir, **dataclasses.asdict(cfg), precisions=check.precisions, log=click.echo)
    click.echo("encoders: " + ", ".join(m["encoders"]))
    size = sum(f["size"] for f in m["files"].values())
    click.echo(f"bundle: {out_dir} ({len(m['files'])} files, {size / 1e6:.1f} MB; random weights)")


@main.command("onnx")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def onnx_cmd(checkpoint, out_dir):
    """Export the ViT, aggregator and fusion to ONNX and check them against PyTorch."""
    from samf.export.onnx_export import export_onnx
    from samf.train.vlm import SamfVLM

    diffs = export_onnx(SamfVLM.from_checkpoint(checkpoint), out_dir)
    for k, v in diffs.items():
        click.echo(f"{k}.onnx: max |ORT - torch| = {v:.2e}")


@main.command("gguf")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@config_options(GgufConfig, only=("outtype",))
def gguf_cmd(checkpoint, out_path, **given):
    """Convert a merged Phi-3 checkpoint to GGUF (tensors streamed one at a time; norms stay F32)."""
    from samf.export.gguf_convert import convert_to_gguf

    click.echo(f"wrote {convert_to_gguf(checkpoint, out_path, config_from(GgufConfig, given).outtype)}")


@main.command("quantize")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@config_options(GgufConfig, only=("qtype",), qtype=QUANT_CHECK)
def quantize_cmd(src, dst, **given):
    """Quantize a GGUF with llama.cpp."""
    from samf.engines.native import quiet_native_stderr
    from samf.export.gguf_convert import quantize_gguf

    with quiet_native_stderr():
        quantize_gguf(src, dst, config_from(GgufConfig, given).qtype)
    click.echo(f"wrote {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


def _verify_everything(bundle) -> int:
    """Re-hash every artifact of a bundle read with read_bundle, print one line each; BundleError unless all
    match. Returns the file count."""
    from samf.errors import BundleError
    from samf.runtime.bundle.bundle import verify_all

    results = verify_all(bundle)
    for name, size, problem in results:
        click.echo(f"{'ok' if problem is None else 'ALTERED':<8}{name} ({size / 1e6:.1f} MB)")
    bad = [name for name, _, problem in results if problem]
    if bad:
        raise BundleError(f"{bundle.root}: {len(bad)} of {len(results)} files do not match their sha256 in the "
                          f"manifest: {', '.join(bad)}")
    return len(results)


@main.command("verify")
@click.argument("bundle_dir", type=click.Path())
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              envvar="SAMF_TRUSTED_KEY", help="public key that must have signed the bundle (repeatable)")
def verify_cmd(bundle_dir, trusted_keys):
    """Re-hash every artifact of BUNDLE_DIR against its manifest, ignoring the verification cache.

    A start hashes only what it loads and skips files unchanged since they were last hashed; this checks all."""
    from samf.runtime.bundle.bundle import read_bundle

    n = _verify_everything(read_bundle(bundle_dir, verify_hashes=False, trusted_keys=trusted_keys))
    signed = " and its signature is by a trusted key" if trusted_keys else ""
    click.echo(f"{bundle_dir}: all {n} files match the manifest{signed}")


@main.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False))
def keygen_cmd(private_key):
    """Make an Ed25519 key pair for signing bundles: PRIVATE_KEY (PEM, readable by you only) and
    PRIVATE_KEY.pub, the public key that workstations trust. `openssl genpkey -algorithm ed25519` and
    `ssh-keygen -t ed25519` keys work as well."""
    from samf.runtime.bundle.signature import write_keypair

    public, fp = write_keypair(private_key)
    click.echo(f"wrote {private_key!r} (keep it secret) and {public!r} ({fp})")


@main.command("sign")
@click.argument("bundle_dir", type=click.Path())
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False),
              help="Ed25519 private key, PEM or OpenSSH (passphrase in $SAMF_KEY_PASSPHRASE)")
def sign_cmd(bundle_dir, private_key):
    """Sign BUNDLE_DIR's manifest (and so every artifact's sha256) after re-hashing every artifact: writes
    manifest.sig, which `samf report --trusted-key` requires."""
    from samf.runtime.bundle.bundle import read_bundle
    from samf.runtime.bundle.signature import load_private_key, sign_manifest

    load_private_key(private_key)  # a bad key or passphrase fails before minutes of hashing
    bundle = read_bundle(bundle_dir, verify_hashes=False)
    n = _verify_everything(bundle)  # the manifest read once: the bytes signed are those the files matched
    fp = sign_manifest(bundle_dir, bundle.manifest_bytes, private_key)
    click.echo(f"{bundle_dir}: {n} files verified, manifest signed by {fp}")


@main.command("build-engines")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@config_options(EngineBuildConfig)
def build_engines(bundle_dir, **given):
    """Build TensorRT plans for this GPU from the bundle's ONNX graphs, check each against ONNX Runtime, and
    record them in its manifest."""
    from samf.export.tensorrt_build import build_bundle_engines
    from samf.runtime.bundle.signature import SIGNATURE

    signed = os.path.exists(os.path.join(bundle_dir, SIGNATURE))
    cfg = config_from(EngineBuildConfig, given)
    entry = build_bundle_engines(bundle_dir, **dataclasses.asdict(cfg), log=click.echo)
    click.echo(f"TensorRT {entry['tensorrt']} {entry['precision']} plans for {entry['gpu']} added to "
               f"{bundle_dir}")
    if signed:
        click.echo(f"the manifest changed, so its signature was removed: run `samf-export sign {bundle_dir} --key K`")


if __name__ == "__main__":
    main()
