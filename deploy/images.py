"""Build the images, push them to your registry, and point a Kubernetes overlay at them: one command.

    python3 deploy/images.py --registry registry.example.com/team --tag 0.1.0 \\
        --checkpoint /path/to/blip-image-captioning-large --overlay gpu --push --output deploy/kubernetes/mine
    kubectl kustomize deploy/kubernetes/mine | kubectl apply -f -

Builds `REGISTRY/blip-caption-{triton,gateway,export,model}:TAG` from docker/*/Dockerfile (the model image exports
`--checkpoint` at `--precision` and carries the repository, docker/model/Dockerfile), pushes the three that pods
run (triton, gateway, model) with `--push`,
and writes OUTPUT/kustomization.yaml: the chosen overlay with its images renamed to those (kustomize `images:`).
The manifests name `blip-caption/*`, which no registry serves: apply the written overlay, not the base ones.
`--no-build` only writes the overlay (images built elsewhere); `--dry-run` prints the commands it would run.
Standard library only; the builder is `docker` or `podman` (`--builder`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"
# The names the manifests use, and the images built for them (the export image only builds the model image).
IMAGES = ("triton", "gateway", "export", "model")
DEPLOYED = ("triton", "gateway", "model")


def image_name(registry: str, name: str, tag: str) -> str:
    return f"{registry.rstrip('/')}/blip-caption-{name}:{tag}"


def build_commands(args: argparse.Namespace) -> list[list[str]]:
    """The builder's commands, in order: the model image is built from the export image."""
    commands = []
    for name in IMAGES:
        tag = image_name(args.registry, name, args.tag)
        build = [args.builder, "build", "-f", str(ROOT / "docker" / name / "Dockerfile"), "-t", tag]
        build += [f"--build-arg={b}" for b in args.build_arg]
        if name == "model":
            build += [f"--build-arg=EXPORT_IMAGE={image_name(args.registry, 'export', args.tag)}",
                      f"--build-arg=PRECISION={args.precision}", str(args.checkpoint)]
        else:
            build.append(str(ROOT))
        commands.append(build)
        if args.push and name in DEPLOYED:
            commands.append([args.builder, "push", tag])
    return commands


def kustomization(args: argparse.Namespace) -> str:
    overlay = os.path.relpath(OVERLAYS / args.overlay, args.output.resolve())
    lines = ["# Written by deploy/images.py: the " + args.overlay + " overlay with images from " + args.registry + ".",
             "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:", f"  - {overlay}",
             "images:"]
    for name in DEPLOYED:
        new_name, tag = image_name(args.registry, name, args.tag).rsplit(":", 1)
        lines += [f"  - name: blip-caption/{name}", f"    newName: {new_name}", f'    newTag: "{tag}"']
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/images.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="where the images go, e.g. registry.example.com/team")
    parser.add_argument("--tag", default="0.1.0", help="the images' tag (default: %(default)s)")
    parser.add_argument("--overlay", choices=sorted(p.name for p in OVERLAYS.iterdir()), default="gpu")
    parser.add_argument("--output", type=Path, required=True, help="directory of the overlay to write")
    parser.add_argument("--checkpoint", type=Path, help="HuggingFace checkpoint directory the model image exports")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                        help="the model image's precision (default: %(default)s; int8 on CPU nodes only)")
    parser.add_argument("--builder", default="docker", help="docker or podman (default: %(default)s)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="passed to every build (e.g. PIP_OPTIONS=...); repeat for more")
    parser.add_argument("--push", action="store_true", help="push the images after building them")
    parser.add_argument("--no-build", action="store_true", help="only write the overlay")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the overlay; change nothing")
    args = parser.parse_args(argv)
    if args.precision == "int8" and args.overlay == "gpu":
        parser.error("--precision int8 runs on CPUs only: use --overlay cpu, or fp32 / fp16 on GPUs")
    commands = [] if args.no_build else build_commands(args)
    if commands and args.checkpoint is None:
        parser.error("--checkpoint is needed to build the model image (or give --no-build)")
    for command in commands:
        print("+ " + shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    text = kustomization(args)
    if args.dry_run:
        print(text, end="")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "kustomization.yaml").write_text(text)
    print(f"wrote {args.output / 'kustomization.yaml'}: kubectl kustomize {args.output} | kubectl apply -f -")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"deploy/images.py: error: {shlex.join(exc.cmd)} exited with status {exc.returncode}", file=sys.stderr)
        sys.exit(1)
