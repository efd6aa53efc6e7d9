"""The paper's baseline mixing methods (DGA, DoGE, Skill-It, Aioli) behind the ``Strategy`` interface.

Importing this package registers them in ``rnb_ray.balance.strategy.STRATEGIES``.
"""

from rnb_ray.balance.baselines.aioli import Aioli
from rnb_ray.balance.baselines.dga import DGA
from rnb_ray.balance.baselines.doge import DoGE
from rnb_ray.balance.baselines.skillit import SkillIt

__all__ = ["DGA", "Aioli", "DoGE", "SkillIt"]
