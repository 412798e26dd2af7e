"Everything a user needs: `from res2netplus.all import *` (hand-written, like `fastai.vision.all`)"
from fastai.vision.all import *
from res2netplus.layers import *
from res2netplus.fast import *
from res2netplus.weights import *
from res2netplus.models import *
from res2netplus.data import *
from res2netplus.augment import *
from res2netplus.learner import *
from res2netplus.act_schedule import *
from res2netplus.segmentation import *
from res2netplus.detection import *
from res2netplus.deploy import *
from res2netplus.distributed import *
from res2netplus.hub import save_pretrained, push_to_hub, from_pretrained
from res2netplus.timm_api import *
