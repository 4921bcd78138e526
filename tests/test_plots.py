import subprocess

from mhd_uad.evaluation.plots import render_plots


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_plots_render_offline_against_a_base_revision(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "plots" / "train" / "t1-fold0").mkdir(parents=True)
    (tmp_path / "plots" / "WMH").mkdir(parents=True)
    (tmp_path / "plots" / "train" / "t1-fold0" / "train.csv").write_text("step,loss\n10,0.5\n20,0.3\n")
    (tmp_path / "plots" / "WMH" / "pr_mhd.csv").write_text("threshold,recall,precision\n0.1,1,0.1\n0.5,0.2,0.6\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base")
    (tmp_path / "plots" / "WMH" / "pr_mhd.csv").write_text("threshold,recall,precision\n0.1,1,0.2\n0.5,0.3,0.7\n")
    index = render_plots(tmp_path, tmp_path / "out", base="HEAD")
    text = index.read_text()
    assert "against HEAD" in text and "plots_WMH.png" in text and "plots_train_t1-fold0.png" in text
    assert "http" not in text  # nothing loaded from a network
    for name in ("plots_WMH.png", "plots_train_t1-fold0.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
