#!/usr/bin/env python3
"""Build and inspect OCI image layouts without Docker (stdlib only).

  ocitool.py make DIR TAG [--layers N] [--layer-kib K] [--format oci|docker]
      Writes an OCI image layout (oci-layout, index.json, blobs/sha256/...)
      holding one image tagged TAG: N gzip'd tar layers of random
      (incompressible) files of ~K KiB each, a config and a manifest.
      Prints the manifest digest.  --format docker uses Docker schema2 media
      types (for clients that want them); the layout is OCI either way.

  ocitool.py inspect DIR TAG
      Verifies every blob the image references exists and hashes to its name
      and prints one JSON object:
      {"manifest": "sha256:..", "config": "sha256:..", "layers": [...]}
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import time

MT = {
    "oci": {
        "manifest": "application/vnd.oci.image.manifest.v1+json",
        "config": "application/vnd.oci.image.config.v1+json",
        "layer": "application/vnd.oci.image.layer.v1.tar+gzip",
    },
    "docker": {
        "manifest": "application/vnd.docker.distribution.manifest.v2+json",
        "config": "application/vnd.docker.container.image.v1+json",
        "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    },
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(layout: str, data: bytes) -> str:
    digest = sha256(data)
    path = os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return digest


def make_layer(index: int, kib: int):
    """Returns (gzip bytes, uncompressed tar digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("data/")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        d.mtime = int(time.time())
        tar.addfile(d)
        # A few files per layer so the tar has some structure.
        remaining = kib * 1024
        n = 0
        while remaining > 0:
            size = min(remaining, 64 * 1024)
            ti = tarfile.TarInfo("data/layer%d-file%03d.bin" % (index, n))
            ti.size = size
            ti.mode = 0o644
            ti.mtime = d.mtime
            tar.addfile(ti, io.BytesIO(os.urandom(size)))
            remaining -= size
            n += 1
    tar_bytes = raw.getvalue()
    gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return gz, sha256(tar_bytes)


def cmd_make(args):
    layout = args.dir
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    mt = MT[args.format]

    layers, diff_ids, history = [], [], []
    for i in range(args.layers):
        gz, diff_id = make_layer(i, args.layer_kib)
        layers.append({"mediaType": mt["layer"], "digest": write_blob(layout, gz), "size": len(gz)})
        diff_ids.append(diff_id)
        history.append({"created": "2024-01-01T00:00:00Z",
                        "created_by": "ocitool.py random layer %d" % i})

    config = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": args.arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/true"],
                   "Labels": {"org.pullcache.test": "e2e"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    cfg = json.dumps(config, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt["manifest"],
        "config": {"mediaType": mt["config"], "digest": write_blob(layout, cfg), "size": len(cfg)},
        "layers": layers,
    }
    man = json.dumps(manifest, separators=(",", ":")).encode()
    man_digest = write_blob(layout, man)

    index_path = os.path.join(layout, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    # Replace any previous entry with the same tag.
    index["manifests"] = [m for m in index.get("manifests", [])
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != args.tag]
    index["manifests"].append({
        "mediaType": mt["manifest"], "digest": man_digest, "size": len(man),
        "platform": {"architecture": args.arch, "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": args.tag},
    })
    with open(index_path, "w") as f:
        json.dump(index, f)
    print(man_digest)


def read_blob(layout, digest):
    algo, hexd = digest.split(":", 1)
    path = os.path.join(layout, "blobs", algo, hexd)
    with open(path, "rb") as f:
        data = f.read()
    if algo != "sha256" or sha256(data) != digest:
        raise SystemExit("blob %s does not match its digest" % digest)
    return data


def cmd_inspect(args):
    with open(os.path.join(args.dir, "index.json")) as f:
        index = json.load(f)
    entries = index.get("manifests", [])
    matching = [m for m in entries
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == args.tag]
    if not matching:
        # skopeo writes a single untagged entry when no tag is given.
        if len(entries) == 1 and not args.tag:
            matching = entries
        else:
            raise SystemExit("tag %r not in %s/index.json" % (args.tag, args.dir))
    desc = matching[0]
    manifest = json.loads(read_blob(args.dir, desc["digest"]))
    read_blob(args.dir, manifest["config"]["digest"])
    layers = []
    for layer in manifest["layers"]:
        data = read_blob(args.dir, layer["digest"])
        if len(data) != layer["size"]:
            raise SystemExit("layer %s size mismatch" % layer["digest"])
        layers.append(layer["digest"])
    json.dump({"manifest": desc["digest"], "mediaType": manifest.get("mediaType", desc.get("mediaType")),
               "config": manifest["config"]["digest"], "layers": layers}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


def main():
    ap = argparse.ArgumentParser(description="make/inspect OCI layouts")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("tag")
    m.add_argument("--layers", type=int, default=3)
    m.add_argument("--layer-kib", type=int, default=256)
    m.add_argument("--arch", default="amd64")
    m.add_argument("--format", choices=sorted(MT), default="oci")
    m.set_defaults(func=cmd_make)
    i = sub.add_parser("inspect")
    i.add_argument("dir")
    i.add_argument("tag", nargs="?", default="")
    i.set_defaults(func=cmd_inspect)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
