"""deqlm.models: SequenceLM (embedding -> core(cell) -> softmax), DEQ and unrolled Transformer/TrellisNet."""

from deqlm.models.build import build_model
from deqlm.models.cores import CoreOut, DEQCore, UnrolledCore
from deqlm.models.interface import LMOutput
from deqlm.models.lm import SequenceLM, count_params

__all__ = ["CoreOut", "DEQCore", "LMOutput", "SequenceLM", "UnrolledCore", "build_model", "count_params"]
