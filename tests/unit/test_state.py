import pytest

from resilient.supervisor.state import ALLOWED, TERMINAL, IllegalTransition, JobState, transition

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("src,dst", [(s, d) for s, ds in ALLOWED.items() for d in ds])
def test_every_allowed_transition(src, dst):
    assert transition(src, dst) is dst


def test_forbidden_transitions():
    with pytest.raises(IllegalTransition):
        transition(JobState.PENDING, JobState.RUNNING)
    with pytest.raises(IllegalTransition):
        transition(JobState.RUNNING, JobState.STARTING)  # must go through DIAGNOSING
    for t in TERMINAL:
        for s in JobState:
            with pytest.raises(IllegalTransition):
                transition(t, s)


def test_every_state_has_a_row():
    assert set(ALLOWED) == set(JobState)
