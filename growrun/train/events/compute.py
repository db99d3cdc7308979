"""The compute of a growth event, counted in one place (FLOPs: 2 per multiply-add of conv and
linear layers, growrun.models.count_flops), with F the forward FLOPs per image at the width
before the event and F_front / F_rest a site's front (the network before its block) / the rest
when it is grown:

    statistics pass      3 F per statistics sample (forward and backward); none with
                         growth.stats=training, where the training step is the forward and backward
    search batch front   per line-search image, the front FLOPs it runs through: the batch is carried
                         from block to block, so each site adds its front minus what the carried
                         batch already ran (draws.advance)
    loss evaluations     F_rest per line-search image per loss evaluated (the search's evaluations
                         and the loss after insertion)
    the method's own     what a method spends itself (EventContext.add_flops: firefly's candidate
                         training and scoring, splitting's splitting matrices)

The moments' L1 operation for new BatchNorm channels is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EventCompute:
    forward: int  # F, forward FLOPs per image before the event
    n_stats: int  # statistics samples drawn (0 with growth.stats=training)
    n_search: int  # line-search images
    front: int = 0  # front FLOPs per search image, summed over the sites (carried batch counted once)
    rest: int = 0  # rest FLOPs per search image times the losses evaluated, summed over the sites
    method: int = 0  # the method's own
    _carried: int = 0  # the front FLOPs the carried search batch has already run

    def site(self, f_front: int, f_rest: int, evaluations: int, carried: bool) -> None:
        """One grown site: its front (less what the carried batch already ran) and its losses;
        carried: whether the search batch is carried on to the next site's block."""
        self.front += f_front - self._carried
        self.rest += f_rest * evaluations
        self._carried = f_front if carried else 0

    def add(self, flops: int) -> None:
        self.method += flops

    @property
    def total(self) -> int:
        return 3 * self.forward * self.n_stats + self.n_search * (self.front + self.rest) + self.method
