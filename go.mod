module tcpha

go 1.26.0

require gopkg.in/ini.v1 v1.67.3

require golang.org/x/sys v0.49.0 // indirect
