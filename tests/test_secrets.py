"""Credentials never reach the compiled pipeline: compiled with every credential variable set,
no component or pipeline YAML contains a value. (The chart side is in test_chart.py.)"""

from guilomo.pipeline import compile_all

SECRET_ENV = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-VALUE-123",
    "AWS_ACCESS_KEY_ID": "AKIA-ACCESS-KEY-789",
    "AWS_SESSION_TOKEN": "session-TOKEN-456",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-PASSWORD-321",
    "MLFLOW_TRACKING_TOKEN": "mlflow-TOKEN-654",
}


def test_compiled_pipeline_holds_no_credentials(tmp_path, monkeypatch):
    for k, v in SECRET_ENV.items():
        monkeypatch.setenv(k, v)
    written = compile_all(tmp_path)
    assert len(written) >= 2
    for path in written:
        text = path.read_text()
        for name, value in SECRET_ENV.items():
            assert value not in text, f"{name}'s value in {path.name}"
