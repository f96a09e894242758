"""Base error: anything a user can fix (bad slide, bad params, bad manifest). The CLI prints
str(error) as one line and exits non-zero, without a traceback."""


class PipelineError(RuntimeError):
    pass
