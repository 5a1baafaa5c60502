import sys

from vmha.main import main

sys.exit(main())
