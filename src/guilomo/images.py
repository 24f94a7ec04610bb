"""`guilomo image build | push | tags`: the project's container images, with the Docker SDK.

Variants `cuda` (docker/Dockerfile: GPU pools, the stages, `torchrun`, the chart's MLflow
server) and `cpu` (docker/Dockerfile.cpu: CPU pools, `kfp.local.DockerRunner`), built from the
repository root, tagged `REPOSITORY:VERSION` (what the compiled pipeline references) and
`REPOSITORY:VERSION-gSHA[-dirty]`, `-cpu` added for cpu. Never `latest`: a tag that moves
would make a recorded run unreproducible. Without a Docker engine: a clear error, exit 2.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__

REPO_ROOT = Path(__file__).resolve().parents[2]
#: variant -> (Dockerfile relative to the repository root, tag suffix)
VARIANTS: dict[str, tuple[str, str]] = {
    "cuda": ("docker/Dockerfile", ""),
    "cpu": ("docker/Dockerfile.cpu", "-cpu"),
}
DEFAULT_REPOSITORY = "guilomo"
DEFAULT_TORCH_VERSION = "2.13.0"
# The Docker SDK has no reference parser that validates; this is the grammar of one
# without a tag: optional registry host[:port], slash-separated lowercase path.
_REPOSITORY = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_BUILD_OPTIONS = ("torch_version", "torch_index_url", "base_image", "source_url")


def git_revision(root: Path = REPO_ROOT) -> tuple[str | None, bool]:
    """The commit SHA of `root` and whether tracked files changed (None, False without git)."""

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        )
        return run.stdout.strip()

    try:
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "-uno"))
    except (OSError, subprocess.SubprocessError):
        return None, False


def image_tags(
    repository: str, version: str, sha: str | None, *, variant: str = "cuda", dirty: bool = False
) -> list[str]:
    """`REPOSITORY:VERSION[-cpu]` and, with a commit, `REPOSITORY:VERSION-gSHA12[-dirty][-cpu]`.
    Raises ValueError for a bad repository, version or variant, and for `latest`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if not _REPOSITORY.match(repository):
        raise ValueError(
            f"repository {repository!r} is not an image reference without a tag "
            "(e.g. guilomo or registry.example.com/team/guilomo)"
        )
    suffix = VARIANTS[variant][1]
    base = version.replace("+", "-")  # PEP 440 local versions: '+' is not allowed in a tag
    tags = [f"{base}{suffix}"]
    if sha:
        tags.append(f"{base}-g{sha[:12]}{'-dirty' if dirty else ''}{suffix}")
    for tag in tags:
        if not _TAG.match(tag) or tag == "latest":
            raise ValueError(f"tag {tag!r} is not a valid image tag (version {version!r})")
    return [f"{repository}:{tag}" for tag in tags]


@dataclass(frozen=True)
class BuildPlan:
    """Everything `docker build` gets for one variant."""

    variant: str
    dockerfile: str
    tags: list[str]
    build_args: dict[str, str]
    context: Path

    def describe(self) -> str:
        args = " ".join(f"--build-arg {k}={v}" for k, v in sorted(self.build_args.items()))
        tags = " ".join(f"-t {t}" for t in self.tags)
        return f"docker build -f {self.dockerfile} {args} {tags} {self.context}"


def build_plan(
    variant: str,
    *,
    repository: str = DEFAULT_REPOSITORY,
    torch_version: str = DEFAULT_TORCH_VERSION,
    torch_index_url: str = "",
    base_image: str = "",
    source_url: str = "",
    root: Path = REPO_ROOT,
) -> BuildPlan:
    sha, dirty = git_revision(root)
    tags = image_tags(repository, __version__, sha, variant=variant, dirty=dirty)
    args = {
        "VERSION": __version__,
        "VCS_REF": sha or "unknown",
        "SOURCE_URL": source_url,
        "TORCH_VERSION": torch_version,
        "TORCH_INDEX_URL": torch_index_url,
    } | ({"BASE_IMAGE": base_image} if base_image else {})
    return BuildPlan(variant, VARIANTS[variant][0], tags, args, root)


def docker_client() -> Any:
    """A Docker SDK client that has answered a ping; ValueError (exit 2) when there is none."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except (DockerException, OSError) as exc:
        raise ValueError(
            f"no Docker engine reachable ({type(exc).__name__}: {exc}); start Docker, or set "
            "DOCKER_HOST to a reachable engine (e.g. ssh://user@build-host)"
        ) from None
    return client


def _stream(lines: Any, what: str, quiet: bool) -> dict[str, Any]:
    """Print a build / push progress stream, raising ValueError on its first error entry;
    the last `aux` payload (image id of a build, digest of a push). Hand-written: the SDK's
    high-level build and push print nothing while they run, and push hides errors."""
    aux: dict[str, Any] = {}
    for entry in lines:
        if "error" in entry or "errorDetail" in entry:
            detail = entry.get("errorDetail", {}).get("message") or entry.get("error")
            raise ValueError(f"{what} failed: {str(detail).strip()}")
        if isinstance(entry.get("aux"), dict):
            aux = entry["aux"]
        if not quiet and entry.get("stream"):
            print(entry["stream"], end="", flush=True)
    return aux


def build(plan: BuildPlan, *, pull: bool = True, quiet: bool = False) -> str:
    """Build `plan` and apply all its tags; returns the image id."""
    from docker.errors import DockerException

    client = docker_client()
    first, *others = plan.tags
    try:
        stream = client.api.build(
            path=str(plan.context),
            dockerfile=plan.dockerfile,
            tag=first,
            buildargs=plan.build_args,
            pull=pull,
            rm=True,
            forcerm=True,
            decode=True,
        )
        image_id = _stream(stream, f"docker build ({plan.variant})", quiet).get("ID", "")
        for ref in others:
            client.api.tag(image_id or first, *ref.rsplit(":", 1))
    except DockerException as exc:
        raise ValueError(f"docker build ({plan.variant}) failed: {exc}") from None
    return image_id


def push(tags: list[str], *, quiet: bool = False) -> dict[str, str]:
    """Push every tag; returns tag -> registry digest (sha256:...)."""
    from docker.errors import DockerException

    client = docker_client()
    digests = {}
    for ref in tags:
        try:
            stream = client.api.push(ref, stream=True, decode=True)  # the SDK splits off the tag
            digests[ref] = str(_stream(stream, f"docker push {ref}", quiet).get("Digest", ""))
        except DockerException as exc:
            raise ValueError(
                f"docker push {ref} failed: {exc}; log in to the registry first (docker login)"
            ) from None
    return digests


# ------------------------------------------------------------------ command line


def _plans(args: argparse.Namespace) -> list[BuildPlan]:
    options = {k: v for k, v in vars(args).items() if k in _BUILD_OPTIONS}  # build's only
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    return [build_plan(v, repository=args.repository, **options) for v in variants]


def _image_tags(args: argparse.Namespace) -> int:
    for plan in _plans(args):
        print("\n".join(plan.tags))
    return 0


def _image_build(args: argparse.Namespace) -> int:
    for plan in _plans(args):
        if args.dry_run:
            print(plan.describe())
            continue
        image_id = build(plan, pull=not args.no_pull, quiet=args.quiet)
        print(f"built {plan.variant} image {image_id or '(id not reported)'}")
        print("\n".join(f"  {t}" for t in plan.tags))
    return 0


def _image_push(args: argparse.Namespace) -> int:
    for plan in _plans(args):
        for ref, digest in push(plan.tags, quiet=args.quiet).items():
            repo = ref.rsplit(":", 1)[0]
            print(f"pushed {ref}" + (f"  (pin as {repo}@{digest})" if digest else ""))
    return 0


def add_image_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `guilomo image build | push | tags` on the top-level subparsers."""
    image = sub.add_parser(
        "image",
        help="build, tag and push the container images (Docker SDK)",
        description="Build the CUDA (docker/Dockerfile) and CPU (docker/Dockerfile.cpu) images "
        "from the repository root, tagged REPOSITORY:VERSION and REPOSITORY:VERSION-gSHA (the "
        "cpu variant with a -cpu suffix), never latest. Needs a Docker engine (DOCKER_HOST or "
        "the local socket).",
    )
    actions = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)  # options of every action
    common.add_argument(
        "--variant",
        choices=[*VARIANTS, "all"],
        default="cuda",
        help="cuda (GPU pools, default), cpu (CPU pools, kfp.local.DockerRunner) or all",
    )
    common.add_argument(
        "--repository",
        default=DEFAULT_REPOSITORY,
        help="image repository, with the registry for a push "
        "(e.g. registry.example.com/team/guilomo; default: guilomo)",
    )
    common.add_argument("--quiet", action="store_true", help="no build / push output")
    for name, func, help_, description in [
        ("build", _image_build, "build and tag the image(s)",
         "Build and tag the image(s). The tags carry the package version and the git commit; "
         "the compiled pipeline references REPOSITORY:VERSION."),
        ("push", _image_push, "push the built tags and print their digests",
         "Push every tag of the image(s) to the registry in --repository and print each tag's "
         "digest (pin REPOSITORY@DIGEST in the cluster). Log in with docker login first."),
        ("tags", _image_tags, "print the tags a build would apply",
         "Print the tags `guilomo image build` applies (no Docker engine needed)."),
    ]:  # fmt: skip
        p = actions.add_parser(name, parents=[common], help=help_, description=description)
        p.set_defaults(func=func)
    b = actions.choices["build"]
    b.add_argument(
        "--torch-version", default=DEFAULT_TORCH_VERSION, help="torch release to install"
    )
    b.add_argument(
        "--torch-index-url",
        default="",
        help="PyTorch wheel index of the wanted variant (a CUDA version for cuda, the CPU index "
        "for cpu); default: pip's configured index",
    )
    b.add_argument("--base-image", default="", help="override the Dockerfile's BASE_IMAGE")
    b.add_argument("--source-url", default="", help="org.opencontainers.image.source label")
    b.add_argument("--no-pull", action="store_true", help="do not pull a newer base image")
    b.add_argument(
        "--dry-run", action="store_true", help="print the docker build command line and stop"
    )
