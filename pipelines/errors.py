"""The one error a job raises for what the user must change: the command line prints it and exits 2."""


class JobError(Exception):
    """A job cannot run as asked (a missing manifest, an unknown model, GPUs asked for and absent);
    str names the file or option and the reason."""
