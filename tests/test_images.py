"""`guilomo image`: tags (version + git SHA, never latest), the build plan, and a clear exit-2
error when no Docker engine is reachable (none is on CI machines)."""

import argparse

import pytest

from guilomo import __version__
from guilomo.images import (
    add_image_parsers,
    build_plan,
    docker_client,
    git_revision,
    image_tags,
)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="guilomo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_image_parsers(sub)
    return parser.parse_args([str(a) for a in argv])


@pytest.mark.parametrize(
    "repository,version,sha,variant,dirty,expected",
    [
        ("guilomo", "0.1.0", None, "cuda", False, ["guilomo:0.1.0"]),
        (
            "guilomo",
            "0.1.0",
            "0123456789abcdef0123",
            "cuda",
            False,
            ["guilomo:0.1.0", "guilomo:0.1.0-g0123456789ab"],
        ),
        (
            "registry.example.com:5000/ml/guilomo",
            "0.1.0",
            "0123456789abcdef0123",
            "cpu",
            True,
            [
                "registry.example.com:5000/ml/guilomo:0.1.0-cpu",
                "registry.example.com:5000/ml/guilomo:0.1.0-g0123456789ab-dirty-cpu",
            ],
        ),
        ("guilomo", "0.2.0+local.1", None, "cuda", False, ["guilomo:0.2.0-local.1"]),
    ],
)
def test_tags_carry_version_and_sha(repository, version, sha, variant, dirty, expected):
    assert image_tags(repository, version, sha, variant=variant, dirty=dirty) == expected


@pytest.mark.parametrize(
    "repository,version,variant,message",
    [
        ("Guilomo", "0.1.0", "cuda", "not an image reference"),
        ("guilomo:0.1.0", "0.1.0", "cuda", "not an image reference"),
        ("guilomo", "latest", "cuda", "not a valid image tag"),
        ("guilomo", "0.1.0", "rocm", "choose one of cuda, cpu"),
    ],
)
def test_bad_tags_are_refused(repository, version, variant, message):
    with pytest.raises(ValueError, match=message):
        image_tags(repository, version, None, variant=variant)


def test_the_pipeline_references_the_built_tag():
    from guilomo.pipeline import IMAGE

    assert IMAGE in image_tags("guilomo", __version__, None)
    assert not IMAGE.endswith(":latest")


def test_build_plan_of_this_checkout():
    sha, dirty = git_revision()
    plan = build_plan("cpu", torch_index_url="https://wheels.example/cpu")
    assert plan.dockerfile == "docker/Dockerfile.cpu"
    assert plan.tags[0] == f"guilomo:{__version__}-cpu"
    if sha:
        assert plan.tags[1].startswith(f"guilomo:{__version__}-g{sha[:12]}")
        assert plan.tags[1].endswith("-dirty-cpu" if dirty else "-cpu")
    assert plan.build_args["TORCH_VERSION"] == "2.13.0"
    assert plan.build_args["VCS_REF"] == (sha or "unknown")
    assert "--build-arg TORCH_INDEX_URL=https://wheels.example/cpu" in plan.describe()
    assert (plan.context / plan.dockerfile).is_file()


def test_dry_run_prints_both_variants(capsys):
    args = parse("image", "build", "--variant", "all", "--dry-run")
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("docker build -f docker/Dockerfile ")
    assert out[1].startswith("docker build -f docker/Dockerfile.cpu ")
    assert "latest" not in "".join(out)


def test_tags_command_needs_no_engine(capsys):
    args = parse("image", "tags", "--repository", "registry.example.com/ml/guilomo")
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"registry.example.com/ml/guilomo:{__version__}"
    )


@pytest.mark.parametrize("action", ["build", "push"])
def test_no_engine_is_a_clear_error(monkeypatch, tmp_path, action):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    with pytest.raises(ValueError, match="no Docker engine reachable.*DOCKER_HOST"):
        docker_client()
    args = parse("image", action, "--quiet")
    with pytest.raises(ValueError, match="no Docker engine reachable"):
        args.func(args)
