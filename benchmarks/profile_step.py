"""Where a training step's time goes: torch.profiler over a few steps of one model, top operators by self time.

    python benchmarks/profile_step.py res2netplus50                 # CPU, batch 8 at 224
    python benchmarks/profile_step.py res2netplus50 --device cuda   # GPU, AMP + channels_last, batch 128 at 224
"""
import argparse, sys, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).parent))
from speed import Runner, GPU_TRAIN_MODELS, sync

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', choices=GPU_TRAIN_MODELS)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--bs', type=int, help='batch size (default 128 on a GPU, 8 on a CPU)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--rows', type=int, default=25)
    args = p.parse_args()
    import torch
    from torch.profiler import profile, ProfilerActivity
    cuda = args.device == 'cuda'
    if cuda: torch.backends.cudnn.benchmark = True
    else: torch.set_num_threads(2)
    amp = (torch.bfloat16 if cuda else None)
    r = Runner(args.model, 'train', args.bs or (128 if cuda else 8), args.size, args.device, cuda, amp)
    for _ in range(3): r.step()
    sync(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps): r.step()
        sync(args.device)
    key = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
    print(f'{args.model}, {args.device}, {args.steps} steps')
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))

if __name__ == '__main__': main()
