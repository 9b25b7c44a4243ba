import pytest

from resilient.config import apply_overrides, load_spec, validate_tree
from resilient.errors import SpecError, UserError
from tests.helpers import write_job

pytestmark = pytest.mark.timeout(60)


def test_good_spec_and_overrides(tmp_path):
    spec = load_spec(
        write_job(tmp_path),
        [
            "train.steps=40",
            "train.lr=1e-3",
            'name="other"',
            "cluster.resources_per_worker={CPU=0.5}",
        ],
    )
    assert spec.train.steps == 40 and spec.train.lr == 1e-3 and spec.name == "other"
    assert spec.cluster.resources_per_worker == {"CPU": 0.5}
    assert spec.checkpoint.storage.startswith("file://")


def test_yaml_spec(tmp_path):
    (tmp_path / "c.txt").write_text("hello world\n" * 50)
    y = tmp_path / "j.yaml"
    y.write_text(f"name: y\ndata:\n  path: {tmp_path / 'c.txt'}\ntrain:\n  steps: 3\n")
    assert load_spec(y).train.steps == 3


@pytest.mark.parametrize(
    "override,field",
    [
        ('cluster.num_workers="two"', "cluster.num_workers"),
        ("cluster.bogus=1", "cluster.bogus"),
        ("train.steps=0", "train.steps"),
        ('train.lr_scheduler="cosine_wobble"', "train.lr_scheduler"),
        ('model.dtype="float8"', "model.dtype"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps"),
        ("supervisor.hang_timeout=0.5", "supervisor"),
        ('peft.method="nonsense"', "peft"),
        ("peft.bogus_option=1", "peft.bogus_option"),
        ("peft.lora_alfa=8", "did you mean peft.lora_alpha"),
        ("train.batch_sise=4", "train.batch_sise: unknown key; did you mean train.batch_size?"),
        ("supervisor.heartbeat_intervall=1.0", "did you mean supervisor.heartbeat_interval?"),
        ('train.lr_scheduler="reduce_lr_on_plateau"', "'reduce_lr_on_plateau' needs a metric"),
        ('peft.task_type="SEQ_CLS"', "peft.task_type cannot be set"),
        ("train.loraplus_lr_ratio=0.5", "train.loraplus_lr_ratio"),
        ("train.loraplus_lr_ratio=-1", "train.loraplus_lr_ratio"),
        ('cluster.backend="mpi"', "cluster.backend"),
        ('chaos=[{at_step=3, fault="kill", rank=5}]', "chaos"),
        ('chaos=[{at_step=3, fault="meteor", rank=0}]', "chaos.0.fault"),
    ],
)
def test_bad_spec_names_the_field(tmp_path, override, field):
    with pytest.raises(SpecError) as e:
        load_spec(write_job(tmp_path), [override])
    assert field in str(e.value)
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize(
    "peft,named",
    [
        ({"method": "ia3", "r": 4}, r"peft.r is not a key of peft's IA3Config"),
        ({"method": "prefix_tuning", "num_virtual_tokens": 4, "lora_alpha": 8}, "peft.lora_alpha"),
        ({"method": "prompt_tuning"}, "peft.num_virtual_tokens is required"),
        ({"method": "lora", "init_lora_weights": "pissa"}, "changes the base model's weights"),
        ({"method": "lora", "r": True}, "peft.r must be a whole number"),
        ({"method": "lokr", "r": 0}, "peft.r must be a whole number"),
        ({"method": "lora", "layers_pattern": "layers"}, "peft \\(lora\\): .*layers_to_transform"),
    ],
)
def test_peft_keys_are_checked_against_the_methods_config_class(tmp_path, peft, named):
    tree = {"name": "t", "data": {"path": "c.txt"}, "peft": peft}
    with pytest.raises(SpecError, match=named):
        validate_tree(tree)
    prompt = peft["method"].endswith("_tuning")
    fixed = {"method": peft["method"], **({"num_virtual_tokens": 4} if prompt else {})}
    assert validate_tree({**tree, "peft": fixed}).peft


def test_loraplus_needs_lora_and_off_keeps_the_old_fingerprint(tmp_path):
    with pytest.raises(SpecError, match='\n  train.loraplus_lr_ratio needs peft.method = "lora"'):
        validate_tree(
            {
                "name": "t",
                "data": {"path": "c.txt"},
                "peft": {"method": "ia3"},
                "train": {"loraplus_lr_ratio": 16},
            }
        )
    off = load_spec(write_job(tmp_path))
    assert "loraplus_lr_ratio" not in str(off.train.model_dump(exclude=off._not_fingerprinted()))
    on = load_spec(write_job(tmp_path), ["train.loraplus_lr_ratio=16"])
    assert on.fingerprint() != off.fingerprint()


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_override_syntax():
    with pytest.raises(SpecError, match="dotted.key=value"):
        apply_overrides({}, ["novalue"])
    assert apply_overrides({}, ["a.b=hello world"]) == {"a": {"b": "hello world"}}


def test_fingerprint_ignores_steps_and_chaos(tmp_path):
    a = load_spec(write_job(tmp_path))
    b = load_spec(
        write_job(tmp_path), ["train.steps=99", 'chaos=[{at_step=3, fault="kill", rank=1}]']
    )
    c = load_spec(write_job(tmp_path), ["train.seed=8"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_fingerprint_is_the_global_batch_not_the_world(tmp_path):
    """A checkpoint restores at another world size when the global batch is the same."""
    a = load_spec(write_job(tmp_path), ["cluster.num_workers=2", "train.batch_size=4"])
    same = load_spec(write_job(tmp_path), ["cluster.num_workers=4", "train.batch_size=2"])
    other = load_spec(write_job(tmp_path), ["cluster.num_workers=4", "train.batch_size=4"])
    assert a.global_batch() == same.global_batch() == 8
    assert a.fingerprint() == same.fingerprint() != other.fingerprint()


def test_model_needs_exactly_one_source(tmp_path):
    tree = {
        "name": "x",
        "data": {"path": str(write_job(tmp_path).parent / "corpus.txt")},
        "model": {"builtin": "tiny-llama", "path": str(tmp_path)},
    }
    with pytest.raises(SpecError, match="exactly one"):
        validate_tree(tree)


def test_spec_checks_no_file_but_the_launcher_does(tmp_path):
    """Workers validate the spec on nodes that do not see the driver's disk: only the launcher
    checks the data file and the model directory (exit 2, naming the field)."""
    from resilient.launcher import inputs, staging

    spec = load_spec(write_job(tmp_path), ['data.path="/no/such/file"'])
    with pytest.raises(SpecError, match="data.path"):
        inputs.check_data(spec, str(tmp_path), str(tmp_path / "tmp"))
    spec = load_spec(write_job(tmp_path), ['model.path="/no/such/model"', 'model.builtin=""'])
    with pytest.raises(UserError, match="model.path"):
        staging.model_dir(spec, str(tmp_path))
    spec = load_spec(
        write_job(tmp_path), ['model.path="memory://nothing/here"', 'model.builtin=""']
    )
    with pytest.raises(UserError, match="model.path"):
        staging.model_dir(spec, str(tmp_path))


def test_launch_tries_the_adapter_on_the_model(tmp_path):
    """Target modules the model lacks, and virtual tokens past its positions, are launch errors."""
    from resilient.launcher.inputs import check_adapter
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    build_tiny_llama(str(tmp_path / "base"), BYTE_VOCAB)
    ok = load_spec(write_job(tmp_path), ['peft={method="loha", r=2, target_modules=["q_proj"]}'])
    check_adapter(ok, str(tmp_path / "base"))
    for override, named in (
        ('peft={method="lora", target_modules=["nope"]}', "peft: Target modules"),
        ('peft={method="prompt_tuning", num_virtual_tokens=2040}', "max_position_embeddings 2048"),
    ):
        with pytest.raises(SpecError, match=named):
            check_adapter(load_spec(write_job(tmp_path), [override]), str(tmp_path / "base"))
