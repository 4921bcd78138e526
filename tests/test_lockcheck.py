from mhd_uad.lockcheck import stale_entries


def test_missing_data_is_not_staleness_but_params_code_and_metrics_are():
    status = {
        "data.dvc": [{"changed outs": {"data": "deleted"}}],
        "prepare": [{"changed deps": {"data": "deleted", "artifacts/splits": "not in cache"}},
                    {"changed outs": {"artifacts/prepared": "deleted"}}],
        "train@t1-0": [{"changed deps": {"src/mhd_uad/training.py": "modified"}}],
        "evaluate@WMH": [{"changed deps": {"params.yaml": {"mhd.ridge": "modified"}}},
                         {"changed outs": {"metrics/WMH.json": "modified"}}],
        "report": ["changed command"],
        "splits": ["always changed"],
    }
    assert stale_entries(status) == [
        "train@t1-0: deps src/mhd_uad/training.py modified",
        "evaluate@WMH: param mhd.ridge modified (params.yaml)",
        "evaluate@WMH: outs metrics/WMH.json modified",
        "report: changed command",
    ]
    assert stale_entries({"prepare": [{"changed deps": {"data": "deleted"}}]}) == []
