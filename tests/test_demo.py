import functools
import json


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from hf_lorax_paper.demo import main
    from hf_lorax_paper.tasks import synthetic

    # the base's pre-training, shortened (4,000 sentences x 3 epochs by default, 9 s of this test's 11): what is
    # asserted is that every stage runs and the reloaded adapter scores what the trained one did, not how well
    monkeypatch.setattr(synthetic, "pretrain_tiny_roberta",
                        functools.partial(synthetic.pretrain_tiny_roberta, n_train=256, epochs=1))
    results = main(["--output_dir", str(tmp_path), "--epochs", "1", "--train_size", "300"])
    assert results["accuracy_reloaded"] == results["main_metric"]["value"]
    assert 0 <= results["accuracy_before"] <= 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "rank_utilization.png").exists() and (tmp_path / "suggested_rank_map.json").exists()
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "dora"
    assert "reloaded from disk" in capsys.readouterr().out
