import sys

from tracking_grpc.cli import main

sys.exit(main())
