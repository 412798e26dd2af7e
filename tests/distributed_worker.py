"""One process of a data-parallel run, for tests/test_distributed.py:
`torchrun --nproc_per_node 2 distributed_worker.py TASK DATA OUT`.

Each rank trains in its own folder OUT/run<rank> (rank 1's must stay empty: only rank 0 writes) and reports what it saw
and its final weights in OUT/rank<rank>.pt."""
import os, sys
from pathlib import Path
import torch
from fastai.vision.all import (Callback, CSVLogger, ImageDataLoaders, Resize, DataBlock, ImageBlock, MaskBlock,
                               RandomSplitter)
from res2netplus.learner import res2netplus_learner, SaveBestWeights, StopOnNaN
from res2netplus.distributed import main_process_first
from res2netplus.data import make_shapes, read_codes, image_files, MaskFromImage

task, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ['RANK'])
run_dir = out/f'run{rank}'
if rank == 0: run_dir.mkdir(parents=True, exist_ok=True)  # fastai's CSVLogger expects the folder

class Seen(Callback):
    "What this rank trained on: a fingerprint and the size of each training batch"
    order = 99
    def before_fit(self): self.batches = []
    def after_batch(self):
        if not self.training: return
        x = self.xb[0]  # detection: a list of images
        self.batches.append((round(float(sum(i.sum() for i in x)), 3), len(x)))

class NaNOnRank1(Callback):
    "A NaN loss on rank 1 alone, at its second training batch"
    order = 1
    def after_loss(self):
        if not (self.training and rank == 1 and self.iter == 1): return
        self.learn.loss_grad = self.learn.loss_grad * float('nan')
        self.learn.loss = self.learn.loss_grad.clone()

seen, extra = Seen(), {}
if task in ('classify', 'nan'):
    dls = ImageDataLoaders.from_folder(data, valid='valid', bs=4, num_workers=0, seed=0, item_tfms=Resize(64))
    learn = res2netplus_learner(dls, mix='cutmix', path=run_dir, model_dir='.', cbs=CSVLogger())
    cbs = [SaveBestWeights(), StopOnNaN(), seen] + ([NaNOnRank1()] if task == 'nan' else [])
    with learn.data_parallel():
        learn.fit_recipe(2 if task == 'classify' else 3, 1e-3, seed=0, checkpoint='checkpoint.pth', cbs=cbs)
elif task == 'segment':
    from res2netplus.segmentation import res2netplus_seg_learner
    with main_process_first(): path = make_shapes(out/'shapes', n_images=16, size=64, seed=1)
    block = DataBlock((ImageBlock, MaskBlock(read_codes(path/'codes.txt'))), get_items=image_files,
                      get_y=MaskFromImage(path/'masks'), splitter=RandomSplitter(0.2, seed=0))
    dls = block.dataloaders(path/'images', bs=3, num_workers=0)
    learn = res2netplus_seg_learner(dls, 'res2netplus50', head='fpn', mix='mixup', path=run_dir, model_dir='.',
                                    cbs=CSVLogger())
    with learn.data_parallel():
        learn.fit_recipe(1, 1e-3, seed=0, checkpoint='checkpoint.pth', cbs=[SaveBestWeights(), seen])
    from res2netplus.distributed import alone
    extra['last_epoch'] = list(map(float, learn.recorder.values[-1]))  # before validate(), which rewrites the record
    learn.remove_cb(CSVLogger)  # the validation below is no epoch of the run: nothing to log
    with alone(): extra['alone'] = list(map(float, learn.validate()))  # 3 validation images: DDP padded them to 4
elif task == 'detect':
    from res2netplus.detection import make_detection_shapes, detection_dataloaders_from_folder, res2netplus_det_learner
    with main_process_first(): path = make_detection_shapes(out/'shapes', n_images=10, size=64, seed=0)
    dls = detection_dataloaders_from_folder(path, bs=2, seed=0, valid_pct=0.4, num_workers=0)
    learn = res2netplus_det_learner(dls, 'res2netplus50', 'detect', min_size=64, max_size=64, path=run_dir,
                                    model_dir='.', cbs=CSVLogger())
    with learn.data_parallel(): learn.fit_one_cycle(1, 0.01, cbs=[SaveBestWeights(), StopOnNaN(), seen])
elif task == 'htc':  # a tiny HTC: masks at every stage and their information flow, under DistributedDataParallel
    from res2netplus.detection import make_detection_shapes, detection_dataloaders_from_folder, res2netplus_det_learner
    with main_process_first(): path = make_detection_shapes(out/'shapes', n_images=10, size=64, seed=0)
    dls = detection_dataloaders_from_folder(path, masks=True, bs=2, seed=0, valid_pct=0.4, num_workers=0)
    learn = res2netplus_det_learner(dls, 'res2net50d', 'instance', detector='htc', min_size=64, max_size=64,
                                    layers=(1, 1, 1, 1), out_channels=32, representation_size=32, mask_channels=16,
                                    box_batch_size_per_image=32, rpn_post_nms_top_n_train=50,
                                    rpn_post_nms_top_n_test=25, path=run_dir, model_dir='.', cbs=CSVLogger())
    with learn.data_parallel(): learn.fit_one_cycle(1, cbs=[SaveBestWeights(), StopOnNaN(), seen])
else: raise SystemExit(f'unknown task {task}')

report = dict(state=learn.model.state_dict(), batches=seen.batches,
              values=[list(map(float, v)) for v in learn.recorder.values], nan_at=getattr(learn, 'nan_at', None),
              n_train=len(learn.dls.train_ds), n_valid=len(learn.dls.valid_ds))
torch.save(dict(**report, **extra), out/f'rank{rank}.pt')
