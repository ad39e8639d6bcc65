"""Bundle signatures: `samf-export sign --key`, then `--trusted-key` refuses anything another key (or nobody)
signed, and any byte of the manifest changed after signing."""

import json
import os
import shutil

import pytest
from cli_runner import invoke_cli, run_cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_cli_errors import assert_clean_failure

from samf.errors import BundleError
from samf.runtime.bundle.bundle import update_manifest
from samf.runtime.bundle.signature import SIGNATURE


@pytest.fixture()
def bundle(quick, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(quick.bundle, dst)
    return str(dst)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two PEM key pairs made by `samf-export keygen`: the site's and someone else's (made once: the tests only
    read them)."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("site", "other"):
        path = str(folder / f"{who}.key")
        proc = run_cli("samf-export", "keygen", path)
        assert proc.returncode == 0, proc.stderr
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        out[who] = (path, path + ".pub")
    return out


def export(*args):
    """``samf-export ARGS`` in this process: these checks are of the message and the exit code (keygen, the first
    sign and the signed report run in fresh interpreters)."""
    return invoke_cli("samf-export", *args)


def verify(bundle, *keys):
    return export("verify", bundle, *[a for k in keys for a in ("--trusted-key", k)])


def test_signed_bundle_runs_with_its_key_and_reports_who_signed(bundle, keys, tmp_path):
    priv, pub = keys["site"]
    proc = run_cli("samf-export", "sign", bundle, "--key", priv)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(os.path.join(bundle, SIGNATURE))
    ok = verify(bundle, keys["other"][1], pub)  # any one trusted key will do
    assert ok.returncode == 0 and "signature is by a trusted key" in ok.stdout, ok.stderr

    from samf.runtime.scan.ct import save_nifti
    from samf.runtime.tools.phantom import make_phantom

    scan = str(tmp_path / "scan.nii.gz")
    ph = make_phantom(3)
    save_nifti(scan, ph.volume, ph.spacing)
    rep = run_cli("samf", "report", scan, "--bundle", bundle, "--trusted-key", pub, "--json", "--max-tokens", "8")
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["identity"]["signed_by"].startswith("sha256:")


def test_unsigned_or_foreign_signatures_are_refused(bundle, keys):
    assert_clean_failure(verify(bundle, keys["site"][1]), "not signed")
    assert export("sign", bundle, "--key", keys["other"][0]).returncode == 0
    assert_clean_failure(verify(bundle, keys["site"][1]), "does not verify")


def test_any_change_to_the_manifest_bytes_breaks_the_signature(bundle, keys):
    """Even one that keeps the JSON's meaning, and so its own digest: the signature covers the exact bytes."""
    priv, pub = keys["site"]
    assert export("sign", bundle, "--key", priv).returncode == 0
    path = os.path.join(bundle, "manifest.json")
    with open(path, "a") as f:
        f.write("\n")
    assert_clean_failure(verify(bundle, pub), "signature does not verify")
    # Without --trusted-key the same bundle still runs: the signature is only required where it is asked for.
    assert verify(bundle).returncode == 0


def test_sign_refuses_an_altered_artifact(bundle, keys):
    p = os.path.join(bundle, "llm-F32.gguf")  # not the default LLM: only `verify`/`sign` hash it
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        f.write(b"\x55\xaa")
    assert_clean_failure(export("sign", bundle, "--key", keys["site"][0]), "llm-F32.gguf")
    assert not os.path.exists(os.path.join(bundle, SIGNATURE))


def test_openssh_keys_and_bad_key_files(bundle, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "id_ed25519", tmp_path / "id_ed25519.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert export("sign", bundle, "--key", str(priv)).returncode == 0
    assert verify(bundle, str(pub)).returncode == 0

    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    assert_clean_failure(export("sign", bundle, "--key", str(locked)), "SAMF_KEY_PASSPHRASE")
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    assert_clean_failure(verify(bundle, str(junk)), "not a PEM or OpenSSH public key")
    assert_clean_failure(verify(bundle, str(tmp_path / "absent.pub")), "cannot read trusted key")


def test_manifest_updates_never_bless_an_altered_file_and_drop_the_signature(bundle, keys):
    assert export("sign", bundle, "--key", keys["site"][0]).returncode == 0
    update_manifest(bundle, lambda m: m.setdefault("note", "updated"))
    assert not os.path.exists(os.path.join(bundle, SIGNATURE))
    assert verify(bundle).returncode == 0
    p = os.path.join(bundle, "llm-F32.gguf")
    with open(p, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    before = open(os.path.join(bundle, "manifest.json"), "rb").read()
    with pytest.raises(BundleError, match="llm-F32.gguf does not match"):
        update_manifest(bundle, lambda m: m.setdefault("note2", "x"))
    assert open(os.path.join(bundle, "manifest.json"), "rb").read() == before
