"""The errors that mean "your input or settings are wrong" (as opposed to a bug): the command-line scripts
print their message, which names the file, key or line and the fix, instead of a traceback."""

from mllm_cl.config import ConfigError
from mllm_cl.consolidation import ConsolidationMismatchError
from mllm_cl.conversation import ConversationError
from mllm_cl.data import DataError
from mllm_cl.evaluation_nl import EvalDataError
from mllm_cl.losses import NoSupervisedTokensError
from mllm_cl.model_folder import ModelFolderError
from mllm_cl.report import ReportInputError
from mllm_cl.stages import StageError
from mllm_cl.tokenizer import TokenizerError
from mllm_cl.trainer import NonFiniteLossError
from mllm_cl.weights import CheckpointMismatchError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ConversationError, DataError, EvalDataError, NoSupervisedTokensError, ModelFolderError,
    TokenizerError, NonFiniteLossError, CheckpointMismatchError, StageError, ReportInputError,
    ConsolidationMismatchError, FileExistsError, FileNotFoundError,
)
