"""`python -m resilient.cli`"""

from resilient.cli import main

main()
