"""params.yaml, the one source of truth for the experiment grid, as four ideas in four modules:

- schema.py: the sections and their keys (pydantic; unknown keys and wrong types are errors naming the key);
- grid.py: the runs of the grid (`<experiment>-s<seed>`) and the one merged config each run's stages get;
- loading.py: strict YAML reading and validation, every run resolved up front;
- reads.py: the declared-read enforcement (a stage can read only the keys it declares).
"""

from ..errors import ParamsError
from .grid import Experiment, milestone_path, run_id, split_run_id
from .loading import check_working_directory, load_params, read_yaml, validate, validate_all
from .reads import UndeclaredParamError, restrict, values
from .schema import Params

__all__ = ["Experiment", "Params", "ParamsError", "UndeclaredParamError", "check_working_directory", "load_params",
           "milestone_path", "read_yaml", "restrict", "run_id", "split_run_id", "validate", "validate_all", "values"]
