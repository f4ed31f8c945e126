from disttrain.config.cli import main

raise SystemExit(main())
