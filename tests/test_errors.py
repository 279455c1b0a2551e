"""Bad input gets a clear TypeError/ValueError naming the argument; never a crash or a silent wrong answer."""

import pytest
import torch

import qkernels


@pytest.mark.parametrize(
    "A",
    [torch.ones(64, dtype=torch.int32), torch.ones(64, dtype=torch.uint8), torch.ones(64, dtype=torch.bool),
     torch.ones(64, dtype=torch.complex64), torch.ones(64, dtype=torch.float64)],
    ids=["int32", "uint8", "bool", "complex64", "float64"],
)
def test_non_float_input_is_a_type_error(A):
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16"):
        qkernels.quantize_4bit(A)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        qkernels.quantize_4bit([1.0, 2.0])


def test_empty_tensor():
    with pytest.raises(ValueError, match="A is empty"):
        qkernels.quantize_4bit(torch.empty(0, 16))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qkernels.quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_bad_quant_type_and_storage():
    with pytest.raises(ValueError, match="quant_type"):
        qkernels.quantize_4bit(torch.randn(128), quant_type="int4")
    with pytest.raises(ValueError, match="quant_storage"):
        qkernels.quantize_4bit(torch.randn(128), quant_storage=torch.int8)
    with pytest.raises(TypeError, match="double_quant"):
        qkernels.quantize_4bit(torch.randn(128), double_quant="yes")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_raises_and_names_the_block(bad):
    """Documented behaviour: NaN/inf raise ValueError naming the first bad block. bitsandbytes would write a
    NaN absmax (or inf, zeroing the block), silently corrupting every value in that block."""
    A = torch.randn(4, 64)
    A[2, 5] = bad
    with pytest.raises(ValueError, match=r"A contains NaN or inf \(first in block 2, elements \[128, 192\)"):
        qkernels.quantize_4bit(A, 64)


def test_bad_dequantize_dtype():
    p, s = qkernels.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="dtype"):
        qkernels.dequantize_4bit(p, s, dtype=torch.int8)


def test_non_contiguous_packed():
    p, s = qkernels.quantize_4bit(torch.randn(256))
    wide = torch.cat([p, p], 1)[:, :1]
    assert not wide.is_contiguous()
    with pytest.raises(ValueError, match="packed must be contiguous"):
        qkernels.dequantize_4bit(wide, s)


def test_forced_backend_errors():
    p, s = qkernels.quantize_4bit(torch.randn(256))
    with pytest.raises(ValueError, match="backend must be one of"):
        qkernels.dequantize_4bit(p, s, backend="fast")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        qkernels.dequantize_4bit(p, s, backend="cuda")


def test_lora_scaling_rejects_bad_rank():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        qkernels.reference.lora_scaling(16, 0)


def test_numpy_integer_blocksize_is_an_int():
    """A NumPy integer blocksize (a config read with NumPy) is the same int; it was refused with "blocksize must be
    one of (32, 64, ...), got np.int64(64)". Floats, strings and bools stay refused (test_bad_blocksize)."""
    np = pytest.importorskip("numpy")
    A = torch.randn(200)
    p, s = qkernels.quantize_4bit(A, np.int64(64))
    p2, s2 = qkernels.quantize_4bit(A, 64)
    assert type(s.blocksize) is int and s.blocksize == 64
    assert torch.equal(p, p2) and torch.equal(s.absmax, s2.absmax)
    q, absmax = qkernels.quantize_blockwise(A, blocksize=np.int32(128))
    assert torch.equal(q, qkernels.quantize_blockwise(A, blocksize=128)[0])
    assert torch.equal(qkernels.dequantize_blockwise(q, absmax, blocksize=np.int64(128)),
                       qkernels.dequantize_blockwise(q, absmax, blocksize=128))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_that_requires_grad(backend):
    """out= is written in place outside autograd: a buffer that requires grad is refused while grad mode is on (as
    torch's out= functions do). The native backend wrote into it silently, the reference one raised a RuntimeError
    from deep inside. Under no_grad it is an ordinary buffer."""
    p, s = qkernels.quantize_4bit(torch.randn(8, 64))
    out = torch.empty(8, 64, requires_grad=True)
    with pytest.raises(ValueError, match="out requires grad"):
        qkernels.dequantize_4bit(p, s, out=out, backend=backend)
    with torch.no_grad():
        qkernels.dequantize_4bit(p, s, out=out, backend=backend)
    assert torch.equal(out.detach(), qkernels.dequantize_4bit(p, s, backend=backend))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_out_is_returned_itself(backend):
    """dequantize_4bit(..., out=out) returns out itself, as documented; with a forced backend it returned a new view of
    it (found by tests/fuzz_public_api.py)."""
    p, s = qkernels.quantize_4bit(torch.randn(8, 64))
    out = torch.empty(8, 64)
    assert qkernels.dequantize_4bit(p, s, out=out, backend=backend) is out
    assert torch.equal(out, qkernels.dequantize_4bit(p, s, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_strided_absmax_view(double_quant, backend):
    """A state whose absmax is a strided view decodes like its dense copy on every backend (the native one raised
    "absmax must be contiguous" where the reference accepted it)."""
    import copy

    p, s = qkernels.quantize_4bit(torch.randn(20, 64), 64, double_quant=double_quant)
    strided = copy.copy(s)
    strided.absmax = torch.stack([s.absmax, torch.zeros_like(s.absmax)], 1).reshape(-1)[::2]
    assert not strided.absmax.is_contiguous()
    want = qkernels.dequantize_4bit(p, s, backend=backend)
    assert torch.equal(qkernels.dequantize_4bit(p, strided, backend=backend), want)
    out = torch.empty_like(want)
    assert torch.equal(qkernels.dequantize_4bit(p, strided, out=out, backend=backend), want)


# ----------------------------------------------------------------------------------------- the module-level API
@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16"])
def test_compute_dtype_and_quant_storage_by_name(name):
    """transformers' BitsAndBytesConfig takes bnb_4bit_compute_dtype="bfloat16" (and quant_storage by name); the same
    strings were refused here ("compute_dtype must be None ... got 'bfloat16'"). They now mean the dtype."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    by_name = qkernels.QLoRALinear.from_linear(lin, compute_dtype=name, quant_storage=name)
    by_dtype = qkernels.QLoRALinear.from_linear(lin, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    assert by_name.compute_dtype is torch.bfloat16 and by_name.weight.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    assert torch.equal(by_name(x), by_dtype(x))

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qkernels.apply_qlora(model, target_modules=["0"], compute_dtype=name, quant_storage="uint8")
    assert model[0].compute_dtype is torch.bfloat16 and model[0].weight.dtype == torch.uint8


@pytest.mark.parametrize("bad", ["fp32", "float64", torch.float64, "int8"])
def test_bad_compute_dtype_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"compute_dtype must be None .*\(or its name, e.g. 'bfloat16'\)"):
        qkernels.QLoRALinear(64, 32, compute_dtype=bad)
    with pytest.raises(ValueError, match=r"compute_dtype must be None"):
        qkernels.apply_qlora(torch.nn.Sequential(torch.nn.Linear(64, 32)), target_modules=["0"], compute_dtype=bad)


def test_quant_type_in_capitals_says_lowercase():
    with pytest.raises(ValueError, match=r"got 'NF4'; the names are lowercase: 'nf4'"):
        qkernels.quantize_4bit(torch.randn(64), quant_type="NF4")
    with pytest.raises(ValueError, match=r"got 'FP4'; the names are lowercase: 'fp4'"):
        qkernels.QLoRALinear(64, 32, quant_type="FP4")
    with pytest.raises(ValueError, match=r"got 'int4'$"):
        qkernels.quantize_4bit(torch.randn(64), quant_type="int4")


def test_target_modules_none_or_not_a_list():
    """peft's target_modules=None picks a default list per model type; here it was "TypeError: 'NoneType' object is
    not iterable" from deep inside apply_qlora."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"target_modules is None: pass the module names .* or 'all-linear'"):
        qkernels.apply_qlora(model, target_modules=None)
    with pytest.raises(TypeError, match=r"target_modules must be a list of module names, a regex or 'all-linear', "
                                        r"got int"):
        qkernels.apply_qlora(model, target_modules=5)
    assert isinstance(model[0], torch.nn.Linear)  # untouched


def test_a_single_name_or_a_misspelt_all_linear_says_what_was_meant():
    """A str target_modules is a regex of the whole module name (peft's rule): "q_proj" matches nothing in a model
    whose layer is "0.q_proj", and "all_linear" is no keyword. The error said only "matches no module"; it now says
    to pass a list, or names 'all-linear'."""
    model = torch.nn.Sequential(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 32)}))
    with pytest.raises(ValueError, match=r"'q_proj' matches no module.*regex that must match the whole module name.*"
                                         r"target_modules=\['q_proj'\]"):
        qkernels.apply_qlora(model, target_modules="q_proj")
    with pytest.raises(ValueError, match=r"'all_linear' matches no module of Sequential\. Did you mean 'all-linear'\?"):
        qkernels.apply_qlora(model, target_modules="all_linear")
    with pytest.raises(ValueError, match=r"'nothing' matches no module of Sequential\. Linear layers"):
        qkernels.apply_qlora(model, target_modules="nothing")
    qkernels.apply_qlora(model, target_modules=r".*q_proj")  # the regex of the whole name works
    assert isinstance(model[0]["q_proj"], qkernels.QLoRALinear)


def test_a_float64_model_is_told_to_cast_first():
    """apply_qlora on a model cast with .double(): the message named bitsandbytes' from_bnb, not the fix."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).double()
    with pytest.raises(ValueError, match=r"got torch\.float64 \(cast the model first, model\.float\(\) or "
                                         r"model\.to\(torch\.bfloat16\)"):
        qkernels.apply_qlora(model, target_modules="all-linear")
    int8 = torch.nn.Linear(64, 32)
    int8.weight = torch.nn.Parameter(torch.zeros(32, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"got torch\.int8 \(a bitsandbytes Linear4bit is wrapped"):
        qkernels.QLoRALinear.from_linear(int8)


@pytest.mark.parametrize("r", [2.5, True, 0, -1, "8"])
def test_lora_scaling_rank_must_be_a_positive_integer(r):
    """lora_scaling(16, 2.5) returned 6.4, a scale no layer can have (QLoRALinear refuses r=2.5)."""
    with pytest.raises(ValueError, match="r must be a positive integer"):
        qkernels.lora_scaling(16, r)


def test_lora_scaling_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    assert qkernels.lora_scaling(16, np.int64(8)) == 2.0 and qkernels.lora_scaling(16, 4, use_rslora=True) == 8.0


def test_bits_per_parameter_checks_its_state():
    p, _ = qkernels.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="quant_state must be a qkernels.QuantState, got NoneType"):
        qkernels.bits_per_parameter(p, None)


@pytest.mark.parametrize("table", ["code", "nested_absmax", "nested_code", "offset"])
def test_state_table_on_another_device(table):
    """A state whose codebook (or nested tables) sits on another device than packed failed inside the op with
    "RuntimeError: code is on meta but the data is on cpu", naming neither the state nor the fix. The offset on meta
    failed with "Tensor.item() cannot be called on meta tensors" (found by tests/fuzz_public_api.py)."""
    import copy

    torch.manual_seed(0)
    p, s = qkernels.quantize_4bit(torch.randn(8, 64))
    moved = copy.deepcopy(s)
    if table == "code":
        moved.code = s.code.to("meta")
    elif table == "nested_absmax":
        moved.state2.absmax = s.state2.absmax.to("meta")
    elif table == "offset":
        moved.offset = s.offset.to("meta")
    else:
        moved.state2.code = s.state2.code.to("meta")
    name = {"code": "quant_map", "nested_absmax": "nested_absmax", "nested_code": "nested_quant_map",
            "offset": "quant_state.offset"}[table]
    with pytest.raises(ValueError, match=rf"{name}\)? is on meta but packed .* on cpu; move the whole state with "
                                         r"quant_state.to\('cpu'\)"):
        qkernels.dequantize_4bit(p, moved)
    with pytest.raises(ValueError, match=rf"{name}\)? is on meta"):
        qkernels.matmul_4bit_lora(torch.randn(2, 64), p, moved, None, None, 1.0)


@pytest.mark.parametrize("nested_blocksize", [0, -256, 100, 8192, 2**40, 2**64])
def test_nested_blocksize_out_of_range(nested_blocksize):
    """A state's nested blocksize is a power of two from 1 to 4096 (bitsandbytes writes 256). 8192 and 2**40 were
    accepted (the reference decode then allocated nested_blocksize floats per nested block: 4 TiB at 2**40), 2**64
    failed in the native binding with "Overflow when unpacking long long" (found by tests/fuzz_public_api.py)."""
    p, s = qkernels.quantize_4bit(torch.randn(8, 64))
    s.state2.blocksize = nested_blocksize
    for call in (lambda: qkernels.dequantize_4bit(p, s, backend="cpu"),
                 lambda: qkernels.matmul_4bit_lora(torch.randn(2, 64), p, s, None, None, 1.0)):
        with pytest.raises(ValueError, match=r"nested_blocksize must be a power of two from 1 to 4096 \(bitsandbytes "
                                             rf"writes 256\), got {nested_blocksize}"):
            call()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_codebook_of_any_shape(backend, monkeypatch):
    """A codebook is its entries in order, whatever its shape: validate and the ops count entries, and the native
    kernels read them flat. The reference path raised IndexError (dequantize) or "boundaries tensor must be 1
    dimension" (quantize) for a [4, 4] quant_map or a [16, 16] nested map (found by tests/fuzz_public_api.py)."""
    import copy

    torch.manual_seed(0)
    A = torch.randn(8, 64)
    p, s = qkernels.quantize_4bit(A)
    shaped = copy.deepcopy(s)
    shaped.code, shaped.state2.code = s.code.reshape(4, 4), s.state2.code.reshape(16, 16)
    assert torch.equal(qkernels.dequantize_4bit(p, shaped, backend=backend), qkernels.dequantize_4bit(p, s))
    monkeypatch.setenv("QKERNELS_BACKEND", backend)
    ops = torch.ops.qkernels
    assert torch.equal(ops.quantize_4bit(A, s.code.reshape(4, 4), 64)[0], p)
    q, absmax = ops.quantize_blockwise(A, s.state2.code.reshape(16, 16), 256)
    assert torch.equal(q, ops.quantize_blockwise(A, s.state2.code, 256)[0])
    assert torch.equal(ops.dequantize_blockwise(q, absmax, s.state2.code.reshape(16, 16), 256),
                       ops.dequantize_blockwise(q, absmax, s.state2.code, 256))


# ----------------------------------------------------------------------------------------- adapter paths
def _model_with_adapter():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    return qkernels.apply_qlora(model, target_modules=["0"], r=4)


def test_load_adapter_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter directory '.*nowhere' does not exist\. qkernels reads "
                                                r"local directories only"):
        qkernels.load_adapter(_model_with_adapter(), tmp_path / "nowhere", adapter_name="other")


def test_load_adapter_given_the_weights_file(tmp_path):
    """Passing the adapter's file instead of its directory said "<file>/adapter_config.json not found"."""
    model = _model_with_adapter()
    qkernels.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' is a file; pass the adapter directory that "
                                         r"holds it and adapter_config\.json: '.*a'"):
        qkernels.load_adapter(model, tmp_path / "a" / "adapter_model.safetensors", adapter_name="other")
    with pytest.raises(TypeError, match="path must be a directory path"):
        qkernels.load_adapter(model, None, adapter_name="other")


def test_load_adapter_reads_peft_bin_format(tmp_path):
    """peft's older format (adapter_model.bin, a torch pickle) loads like the safetensors one (peft reads both)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _model_with_adapter()
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()
    qkernels.save_adapter(model, tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(load_file(tmp_path / "st" / "adapter_model.safetensors"), tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_config.json").write_text((tmp_path / "st" / "adapter_config.json").read_text())
    assert qkernels.load_adapter(model, tmp_path / "bin", adapter_name="from_bin") == ["0"]
    for which in ("lora_A", "lora_B"):
        assert torch.equal(getattr(model[0], which)["from_bin"].weight, getattr(model[0], which)["default"].weight)


def test_bad_qkernels_backend_environment_variable(monkeypatch):
    """QKERNELS_BACKEND=fast said "backend must be one of ..., got 'fast'" to a caller that passed no backend."""
    monkeypatch.setenv("QKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable QKERNELS_BACKEND must be one of .* got 'fast'"):
        qkernels.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match=r"^backend must be one of"):  # an explicit argument is named as such
        qkernels.dequantize_4bit(*qkernels.quantize_4bit(torch.randn(64), backend="reference"), backend="fast")


def test_quantize_on_the_meta_device():
    """A weight on the meta device (a model built under init_empty_weights) failed with "Tensor.item() cannot be
    called on meta tensors"; it is a ValueError saying there are no values and what to do. (Layers on the meta device
    are another matter: they quantize nothing and wait for a checkpoint, tests/test_meta.py.)"""
    with pytest.raises(ValueError, match=r"A is on the meta device: it has no values to quantize"):
        qkernels.quantize_4bit(torch.empty(64, 64, device="meta"))


def test_loftq_rank_must_be_positive():
    """loftq_init(W, r=0, ...) returned empty factors."""
    with pytest.raises(ValueError, match=r"r must be a positive int \(the LoRA rank\), got 0"):
        qkernels.loftq_init(torch.randn(64, 64), 0, 1.0)


def test_save_adapter_onto_a_file(tmp_path):
    """save_adapter(model, <existing file>) raised FileExistsError from os.makedirs."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"is a file; save_adapter writes a directory"):
        qkernels.save_adapter(_model_with_adapter(), tmp_path / "f")
