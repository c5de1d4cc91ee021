"""MoSA — split an adapter into sparse modules, train one per step, merge back (arXiv 2312.02923).

    ak.attach(model, ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=16, style="parallel",
                                                            target_modules=["mlp"]), n_modules=4), "task")
    ak.train(model, batches, loss_fn=ak.mosa.two_pass_loss)  # module choice per step and layer
    ak.to_plain(model, "task")  # now a plain bottleneck adapter: the average of the modules
"""

from .config import MoSAConfig
from .consistency import active_consistency_weight, consistency_loss, two_pass_loss
from .layers import MoSABottleneckLayer, MoSALoRALayer
from .method import MoSAMethod, resample
from .split import SplitWeight, partition

__all__ = ["MoSABottleneckLayer", "MoSAConfig", "MoSALoRALayer", "MoSAMethod", "SplitWeight",
           "active_consistency_weight", "consistency_loss", "partition", "resample", "two_pass_loss"]

