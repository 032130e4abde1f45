from loraserve.router.app import main

raise SystemExit(main())
