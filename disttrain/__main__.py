from disttrain.cli.main import main

raise SystemExit(main())
