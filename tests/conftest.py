import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# torch and transformers are imported where used: the xdist controller, which runs no test, loads this file too and
# would otherwise spend seconds importing them before it starts the workers.

# The scheduling units (``--dist loadscope``: a module, or a class) that take longest, longest first (measured on 2
# cores: 20-45 s each, mostly processes that start torch and transformers). xdist hands units out in collection order;
# these go first and the many short units fill in at the end, so the two workers finish together. (xdist's own
# reordering, by number of tests, would start the long few-test units last.)
LONG_FIRST = ("test_zoo.py::TestDecoders", "test_scripts.py", "test_cli.py", "test_scale_out_torch.py",
              "test_zoo.py::TestEncodersAndSeq2Seq", "test_scale_out_deepspeed.py", "test_e2e_metrics.py",
              "test_benchmarks.py", "test_compile.py", "test_isolation.py", "test_zoo.py::TestQLoRA", "test_e2e.py",
              "test_qlora.py", "test_reliability.py", "test_glue.py", "test_fsdp_config.py")


def pytest_configure(config):
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):  # a process that tests
        import torch

        # Under pytest-xdist (``make test`` runs 2 workers on the 2 cores) each worker keeps to one thread.
        torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    if getattr(config.option, "loadscopereorder", None):
        config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gives


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        unit = item.path.name + (f"::{item.cls.__name__}" if item.cls else "")
        return LONG_FIRST.index(unit) if unit in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: within a unit and among the others, the collection order stays


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def build_gpt2(**overrides):
    """A tiny GPT-2 LM from :func:`gpt2_config` (``overrides`` go to the config), seeded, in eval mode."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(**overrides)).eval()


def roberta_config(**overrides):
    from transformers import RobertaConfig

    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2,
                  type_vocab_size=1)
    kwargs.update(overrides)
    return RobertaConfig(**kwargs)


@pytest.fixture
def tiny_gpt2():
    return build_gpt2()


@pytest.fixture
def tiny_gpt2_cls():
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    return GPT2ForSequenceClassification(gpt2_config(num_labels=3)).eval()


@pytest.fixture
def tiny_roberta():
    import torch
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(roberta_config()).eval()


@pytest.fixture
def input_ids():
    import torch

    torch.manual_seed(1)
    return torch.randint(3, 96, (2, 12))


def randomize_adapters(model, seed: int = 0) -> None:
    """Give every adapter parameter non-trivial values (B starts at zero), so parity tests see real deltas."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "magnitude" in name else 0.0) * p)
        for module in model.modules():  # a fused-slice B stays block-structured, as training keeps it
            if getattr(module, "slice_mask", None) is not None:
                module.weight.mul_(module.slice_mask)


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records every call, reaches no network."""

    def __init__(self, token=None):
        self.token = token
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Info()

    def uploaded(self) -> list[str]:
        """Paths in the commit's operations, sorted."""
        commit = next(kwargs for name, kwargs in self.calls if name == "create_commit")
        return sorted(op.path_in_repo for op in commit["operations"])


@pytest.fixture
def recorded_hub(monkeypatch):
    """``hf_lorax.hub.HfApi`` replaced by :class:`RecordingApi`; the list of the instances it made."""
    import hf_lorax.hub as hub

    made = []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: made.append(RecordingApi(token)) or made[-1])
    return made
