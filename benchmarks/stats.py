"What the benchmark tables print of a measurement repeated over seeds"
import statistics

def mean_sd(values, scale:float=1., digits:int=2) -> str:
    "`mean ± sd` of `values` times `scale`; the mean alone for a single value (one seed has no spread)"
    values = [scale * v for v in values]
    mean = f'{statistics.mean(values):.{digits}f}'
    return f'{mean} ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else mean
