"""The one error for an item that cannot be processed: its batch goes on and it is recorded as failed."""


class ItemFailed(Exception):
    """This item (a recording, an augmented copy, a video) cannot be processed; str names the file and why.

    Jobs record it as the item's `failed` row, with str as the reason (`pipelines.shard_job.fill_row`, and
    evaluate's rows); any other exception from an item's work is a bug, recorded as an internal error.
    """
