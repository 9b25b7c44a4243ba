"""A journal on a real S3 server (moto's, through s3fs): the bucket's copy deleted behind the
job's back is found at the writer's next upload, though s3fs has listed the segments before (its
listing cache must not answer for the store)."""

import pytest

from resilient.rundir import RunDir
from resilient.runlog.journal import Journal, JournalLost, read_records

pytestmark = pytest.mark.timeout(60)


def test_a_journal_deleted_from_the_bucket_is_lost_at_the_next_upload(s3):
    rd = RunDir("s3://runs/jobs/j1", {"client_kwargs": {"endpoint_url": s3.endpoint}})
    j = Journal(rd)
    j.append("job", name="n")
    assert j.flush(timeout=20)
    j.append("progress", step=1)
    assert j.flush(timeout=20)
    assert [r["type"] for r in read_records(rd)] == ["job", "progress"]  # listed: cached
    s3.fs().rm("runs/jobs/j1", recursive=True)  # another client cleans the bucket
    j.append("progress", step=2)
    assert not j.flush(timeout=20)
    with pytest.raises(JournalLost, match="s3://runs/jobs/j1/journal was deleted"):
        j.append("progress", step=3)
    assert rd.listdir("journal") == []
