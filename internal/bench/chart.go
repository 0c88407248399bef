package bench

import (
	"bytes"
	"fmt"
	"image/color"
	"math"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

var feColors = map[string]color.Color{
	TCPHA:        color.RGBA{R: 0x1b, G: 0x9e, B: 0x77, A: 0xff},
	TCPHASingle:  color.RGBA{R: 0xa6, G: 0xd8, B: 0x54, A: 0xff},
	TCPHAForward: color.RGBA{R: 0x66, G: 0xa6, B: 0x1e, A: 0xff},
	TCPHABE:      color.RGBA{R: 0x1f, G: 0x78, B: 0xb4, A: 0xff},
	TCPHABEAny:   color.RGBA{R: 0xa6, G: 0xce, B: 0xe3, A: 0xff},
	HAProxy:      color.RGBA{R: 0xd9, G: 0x5f, B: 0x02, A: 0xff},
	Nginx:        color.RGBA{R: 0x75, G: 0x70, B: 0xb3, A: 0xff},
	Direct:       color.RGBA{R: 0x99, G: 0x99, B: 0x99, A: 0xff},
}

// Chart draws the run as a PNG: requests per second relative to direct for
// the wrk workloads, and the FE's CPU per request (log scale), grouped by
// workload with one bar per front end.
func (r *Run) Chart() ([]byte, error) {
	wl := []string{"a", "b", "c", "f", "g", "h"}
	names := []string{"(a) 1 KB close", "(b) 1 KB keep-alive", "(c) 1 MB keep-alive", "(f) alternating BEs", "(g) pages", "(h) media"}

	rate := plot.New()
	rate.Title.Text = "requests per second, relative to direct"
	rate.Y.Label.Text = "× direct"
	rate.Y.Min = 0
	cpu := plot.New()
	cpu.Title.Text = "FE process CPU per request (log scale)"
	// Bars start at 0, which a log axis cannot place: plot log10(µs/0.01)
	// on a linear axis, so bars rise from 10 ns, with ticks labelled.
	cpu.Y.Tick.Marker = plot.ConstantTicks{{Value: 0, Label: "10 ns"}, {Value: 1, Label: "0.1 µs"}, {Value: 2, Label: "1 µs"},
		{Value: 3, Label: "10 µs"}, {Value: 4, Label: "100 µs"}, {Value: 5, Label: "1 ms"}, {Value: 6, Label: "10 ms"}}

	width := vg.Points(14)
	top := 1.0
	for i, fe := range FrontEnds {
		var rv, cv plotter.Values
		for _, w := range wl {
			x, ok := r.Get(fe, w)
			d, okd := r.Get(Direct, w)
			v := 0.0
			if ok && okd && d.RPS > 0 {
				v = x.RPS / d.RPS
			}
			rv = append(rv, v)
			top = math.Max(top, v)
			c := 0.0
			if ok {
				if p := x.CPUPerRequest(); p > 0 {
					c = float64(p) / 1e3
				}
			}
			cv = append(cv, math.Log10(math.Max(c, 0.01))+2)
		}
		offset := vg.Length(i-len(FrontEnds)/2)*width + width/2
		bar, err := plotter.NewBarChart(rv, width)
		if err != nil {
			return nil, err
		}
		bar.Color, bar.LineStyle.Width, bar.Offset = feColors[fe], 0, offset
		rate.Add(bar)
		rate.Legend.Add(fe, bar)
		if fe == Direct {
			continue
		}
		cb, err := plotter.NewBarChart(cv, width)
		if err != nil {
			return nil, err
		}
		cb.Color, cb.LineStyle.Width, cb.Offset = feColors[fe], 0, offset
		cpu.Add(cb)
		cpu.Legend.Add(fe, cb)
	}
	rate.NominalX(names...)
	cpu.NominalX(names...)
	// Headroom above the tallest bar for the legends.
	rate.Legend.Top, rate.Y.Max = true, top*1.45
	cpu.Legend.Top, cpu.Y.Min, cpu.Y.Max = true, 0, 7.2

	plots := [][]*plot.Plot{{rate}, {cpu}}
	sizes, err := r.sizeChart()
	if err != nil {
		return nil, err
	}
	if sizes != nil {
		plots = append(plots, []*plot.Plot{sizes})
	}

	// One above the other: each group of bars gets the whole width.
	w, h := 10*vg.Inch, vg.Length(len(plots))*3.5*vg.Inch
	img := vgimg.New(w, h)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: len(plots), Cols: 1, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 6,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(plots, tiles, dc)
	for i, row := range plots {
		row[0].Draw(canvases[i][0])
	}
	png := vgimg.PngCanvas{Canvas: img}
	var buf bytes.Buffer
	if _, err := png.WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("render chart: %w", err)
	}
	return buf.Bytes(), nil
}

// sizeChart is workload (i): FE process CPU per one-request connection
// against the response size, both on log scales, a line per front end;
// nil when (i) was not run.
func (r *Run) sizeChart() (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "(i) FE process CPU per one-request connection, by response size"
	p.X.Label.Text = "response size (KB)"
	p.Y.Label.Text = "µs per request"
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	p.X.Tick.Marker, p.Y.Tick.Marker = plot.LogTicks{Prec: -1}, plot.LogTicks{Prec: -1}
	any := false
	for _, fe := range SizeFrontEnds {
		var pts plotter.XYs
		for _, kb := range SizesKB {
			x, ok := r.Get(fe, SizeWorkload(kb))
			if !ok {
				continue
			}
			// A log axis cannot place 0: the agent's 0.1 µs floor.
			us := math.Max(float64(x.CPUPerRequest())/1e3, 0.1)
			pts = append(pts, plotter.XY{X: float64(kb), Y: us})
		}
		if len(pts) == 0 {
			continue
		}
		any = true
		l, sc, err := plotter.NewLinePoints(pts)
		if err != nil {
			return nil, err
		}
		l.Color, sc.Color = feColors[fe], feColors[fe]
		p.Add(l, sc)
		p.Legend.Add(fe, l, sc)
	}
	if !any {
		return nil, nil
	}
	p.Legend.Top = true
	return p, nil
}
