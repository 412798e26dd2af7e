"""On a CUDA GPU: the models, the fused paths, mixed precision and fastai training agree with the CPU. Skipped without
one."""
import copy
import pytest
import torch
from conftest import randomize_bn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run on a machine with one)')

@pytest.fixture(autouse=True)
def exact_fp32():
    "TF32 convs and matmuls round to 10 bits: compare float32 against the CPU without them"
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

def _model(name='res2netplus50', **kw):
    from res2netplus import models
    torch.manual_seed(0)
    return randomize_bn(getattr(models, name)(num_classes=10, **kw)).eval()

@pytest.mark.parametrize('name', ['res2netplus50', 'res2net50d', 'res2netplus50_26w_8s'])
def test_eval_float32_matches_cpu(name):
    from res2netplus import models
    if not hasattr(models, name): pytest.skip(f'no variant {name}')
    m = _model(name)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        out = copy.deepcopy(m).cuda()(x.cuda()).cpu()
        cl_model = copy.deepcopy(m).cuda().to(memory_format=torch.channels_last)
        cl = cl_model(x.cuda().contiguous(memory_format=torch.channels_last)).cpu()
    assert (out - ref).abs().max() < 1e-3 and (cl - ref).abs().max() < 1e-3

def test_training_step_matches_cpu():
    "Train-mode forward, gradients and BatchNorm running statistics: CUDA float32 equals the CPU's fused path"
    m = _model().train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    def step(model, dev):
        model = model.to(dev)
        loss = torch.nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
        loss.backward()
        grads = {k: p.grad.cpu() for k, p in model.named_parameters()}
        return loss.item(), grads, {k: b.cpu() for k, b in model.named_buffers()}
    l_cpu, g_cpu, b_cpu = step(copy.deepcopy(m), 'cpu')
    l_gpu, g_gpu, b_gpu = step(copy.deepcopy(m), 'cuda')
    assert abs(l_cpu - l_gpu) < 1e-4
    for k in g_cpu: assert torch.allclose(g_gpu[k], g_cpu[k], atol=1e-4, rtol=1e-3), k
    for k in b_cpu: assert torch.allclose(b_gpu[k].float(), b_cpu[k].float(), atol=1e-4, rtol=1e-4), k

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_channels_last_close_to_float32(dtype):
    m = _model().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 96, 96, device='cuda').contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast('cuda', dtype=dtype): out = m(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05

def test_fuse_for_inference_on_cuda():
    from res2netplus.deploy import fuse_for_inference
    m = _model().cuda()
    fused = fuse_for_inference(m, channels_last=True, check_size=64)
    x = torch.randn(4, 3, 80, 80, device='cuda')
    with torch.no_grad(): assert (fused(x) - m(x)).abs().max() < 1e-4

def train_vision_learner(image_folder, device:str):
    "fastai with bf16 mixed precision on `device`: the learner, its batch losses and one prediction's probabilities"
    from fastai.vision.all import ImageDataLoaders, vision_learner, accuracy
    from res2netplus.models import res2netplus50
    dls = ImageDataLoaders.from_folder(image_folder, valid='valid', bs=8, num_workers=0, seed=0, device=device)
    torch.manual_seed(0)
    learn = vision_learner(dls, res2netplus50, pretrained=False, metrics=accuracy).to_bf16()
    learn.fit_one_cycle(6, 3e-3)
    losses = [float(l) for l in learn.recorder.losses]  # before predict, which starts the recorder afresh
    _, _, probs = learn.predict(dls.valid_ds.items[0])
    return learn, losses, probs

def test_vision_learner_trains_on_cuda_in_mixed_precision(image_folder):
    "The loss falls, the model stays on the GPU, predictions come back on the CPU"
    learn, losses, probs = train_vision_learner(image_folder, 'cuda')
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert next(learn.model.parameters()).is_cuda
    assert probs.shape == (2,) and probs.device.type == 'cpu'

def test_detector_trains_on_cuda():
    from res2netplus.detection import fasterrcnn_res2net_fpn
    torch.manual_seed(0)
    model = fasterrcnn_res2net_fpn('res2netplus50', num_classes=3, min_size=128, max_size=128).cuda().train()
    imgs = [torch.rand(3, 128, 128, device='cuda') for _ in range(2)]
    boxes, labels = torch.tensor([[10., 20., 60., 90.]], device='cuda'), torch.tensor([1], device='cuda')
    targets = [dict(boxes=boxes, labels=labels)] * 2
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = sum(model(imgs, targets).values())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(): out = model(imgs)
    assert out[0]['boxes'].is_cuda and out[0]['boxes'].shape[1] == 4


def _ulps(got, want, dtype):
    "Largest difference in units of `dtype`'s last place, relative to the reference value (float64)"
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    return ((got.double() - want.double()).abs() / (want.double().abs() + 1)).max().item() / ulp

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_triton_mish_kernel_equals_pytorch(dtype):
    """The kernel against PyTorch's Mish evaluated in float64 on the values it reads (a bf16/fp16 sum rounded as PyTorch
    rounds it)"""
    from res2netplus.fast import gpu
    F = torch.nn.functional
    if not gpu._gpu_kernels_ready(torch.device('cuda'), dtype):
        pytest.fail(f'the Triton Mish kernel does not run on this GPU for {dtype}')
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(3, 26, 17, 19, generator=g0) * 8
    x.view(-1)[:5] = torch.tensor([-100., -20., 19.9, 20.1, 25.])
    x, r = x.to(dtype).cuda(), torch.randn(x.shape, generator=g0).to(dtype).cuda()
    limit = 8 if dtype == torch.float32 else 1.01  # float32: a few ulps of arithmetic; bf16/fp16: one rounding
    for cl in (False, True):
        xc = x.contiguous(memory_format=torch.channels_last) if cl else x
        assert _ulps(gpu.gpu_mish(xc), F.mish(x.double()), dtype) < limit
        assert _ulps(gpu.gpu_mish(xc, r), F.mish((x + r).double()), dtype) < limit
        assert gpu.gpu_mish(xc).stride() == xc.stride()

def test_triton_mish_runs_where_no_gradient_is_needed(monkeypatch):
    """Evaluation without gradients runs Mish (and each block's addition) in the Triton kernel, with PyTorch's outputs,
    float32 and bf16 autocast, both layouts; a training step runs PyTorch's modules"""
    from res2netplus.fast import kernels, gpu, dispatch
    monkeypatch.setattr(dispatch, '_GPU_MIN_NUMEL', 0)  # every tensor, at test sizes
    calls = []
    kernel = gpu.gpu_mish
    monkeypatch.setattr(gpu, 'gpu_mish', lambda x, r=None: calls.append(r is not None) or kernel(x, r))
    m = _model().cuda()
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        mc = m.to(memory_format=fmt)
        x = torch.randn(4, 3, 64, 64, device='cuda').contiguous(memory_format=fmt)
        for amp in (None, torch.bfloat16):
            calls.clear()
            with torch.no_grad(), torch.autocast('cuda', dtype=amp or torch.float32, enabled=amp is not None):
                out = mc(x)
                # the stem, every act→BN, each block's end
                assert calls.count(False) == 3 + 16 * 4 and calls.count(True) == 16
                with kernels.fast_path('aten'): ref = mc(x)
            assert len(calls) == 83  # fast_path('aten'): PyTorch's modules
            assert (out.float() - ref.float()).abs().max() / ref.float().abs().max() < (1e-5 if amp is None else 0.03)
    calls.clear()
    m.train()(torch.randn(4, 3, 64, 64, device='cuda')).sum().backward()
    assert calls == []
    monkeypatch.setattr(dispatch, '_GPU_MIN_NUMEL', 2 * 64 * 32 * 32 + 1)
    with torch.no_grad(): m.eval()(torch.randn(2, 3, 64, 64, device='cuda'))
    assert calls == []  # below the size where a launch pays

def test_triton_mish_that_fails_its_check_warns_and_falls_back(monkeypatch):
    from res2netplus.fast import kernels, gpu, dispatch
    monkeypatch.setitem(kernels._fast, 'gpus', {})
    monkeypatch.setattr(dispatch, '_GPU_MIN_NUMEL', 0)
    def broken(device, dtype): raise RuntimeError('no Triton here')
    monkeypatch.setattr(gpu, '_check_gpu_kernels', broken)
    m = _model().cuda()
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with pytest.warns(UserWarning, match="PyTorch's Mish runs instead"), torch.no_grad(): out = m(x)
    with kernels.fast_path('reference'), torch.no_grad(): assert torch.equal(out, m(x))

def test_triton_mish_launches_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: a model on another GPU than the current one must not run on the current
    one's stream"""
    if torch.cuda.device_count() < 2: pytest.skip('needs two GPUs')
    from res2netplus.fast import kernels, dispatch
    monkeypatch.setattr(dispatch, '_GPU_MIN_NUMEL', 0)
    m = _model().to('cuda:1')
    x = torch.randn(2, 3, 64, 64, device='cuda:1')
    with torch.no_grad():
        out = m(x)
        with kernels.fast_path('reference'): ref = m(x)
    assert torch.cuda.current_device() == 0 and (out - ref).abs().max() < 1e-4
