module tcpha

go 1.26.0

require gopkg.in/ini.v1 v1.67.3

require (
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/google/nftables v0.3.1-0.20251119083706-1db35da82052 // indirect
	github.com/mdlayher/netlink v1.9.0 // indirect
	github.com/mdlayher/socket v0.5.1 // indirect
	golang.org/x/net v0.50.0 // indirect
	golang.org/x/sync v0.6.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
