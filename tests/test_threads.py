"""Thread sizing from the CPU a process may use: fake cgroup trees, not this machine's."""

import os

import pytest

from guilomo.threads import cgroup_cpus, configure_threads, thread_count


def v2_tree(tmp_path, leaf_max, parent_max="max"):
    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text(f"{parent_max} 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text(f"{leaf_max} 100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    return tmp_path, proc


def test_quota_of_one_cpu_gives_one_thread(tmp_path):
    root, proc = v2_tree(tmp_path, "100000")
    assert cgroup_cpus(root, proc) == 1.0
    assert thread_count(env={}, root=root, proc_cgroup=proc) == (1, "cpu quota")


def test_tightest_ancestor_and_rounding_down(tmp_path):
    root, proc = v2_tree(tmp_path, "max", parent_max="150000")  # the pod's parent: 1.5 CPUs
    assert cgroup_cpus(root, proc) == 1.5
    assert thread_count(env={}, root=root, proc_cgroup=proc)[0] == 1


def test_cgroup_v1_quota(tmp_path):
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("50000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpus(tmp_path, proc) == 0.5
    assert thread_count(env={}, root=tmp_path, proc_cgroup=proc) == (1, "cpu quota")


def test_no_quota_uses_the_affinity(tmp_path):
    root, proc = v2_tree(tmp_path, "max")
    assert cgroup_cpus(root, proc) is None
    want = len(os.sched_getaffinity(0))
    assert thread_count(env={}, root=root, proc_cgroup=proc) == (want, "cpu quota")


@pytest.mark.parametrize(
    "configured,env,want",
    [
        (3, {"OMP_NUM_THREADS": "5"}, (3, "config")),
        (None, {"OMP_NUM_THREADS": "5"}, (5, "OMP_NUM_THREADS")),
    ],
)
def test_config_then_omp_override_the_quota(tmp_path, configured, env, want):
    root, proc = v2_tree(tmp_path, "100000")
    assert thread_count(configured, env=env, root=root, proc_cgroup=proc) == want


def test_configure_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        params = configure_threads(1)
        assert (params["threads"], params["threads_source"]) == (1, "config")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_prepare_openmp_lowers_the_spin_count_unless_the_user_chose():
    from guilomo.threads import SPINCOUNT, prepare_openmp

    env = {}
    prepare_openmp(env)
    assert env == {"GOMP_SPINCOUNT": SPINCOUNT}
    for chosen in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(chosen)
        prepare_openmp(env)
        assert env == chosen
