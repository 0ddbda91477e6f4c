import json


def test_demo_runs_end_to_end(tmp_path, capsys):
    from hf_lorax_paper.demo import main

    results = main(["--output_dir", str(tmp_path), "--epochs", "1", "--train_size", "300"])
    assert results["accuracy_reloaded"] == results["main_metric"]["value"]
    assert 0 <= results["accuracy_before"] <= 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "rank_utilization.png").exists() and (tmp_path / "suggested_rank_map.json").exists()
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "dora"
    assert "reloaded from disk" in capsys.readouterr().out
