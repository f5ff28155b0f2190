import json, math
from scipy.stats import binomtest
def load(w): return {json.loads(l)['example_id']: json.loads(l) for l in open(f'{w}/rows.jsonl')}
R={w: load(w) for w in ('bf16','q4','int8')}
common=sorted(set.intersection(*(set(r) for r in R.values())), key=lambda k:int(k.split('/')[1]))
n=len(common)
def wilson(k,n,z=1.96):
    p=k/n; d=1+z*z/n; c=(p+z*z/(2*n))/d; h=z*math.sqrt(p*(1-p)/n+z*z/(4*n*n))/d; return c-h,c+h
print('n',n, common[0], common[-1])
ps={}
for w in R:
    k=sum(R[w][e]['scoring']['passed'] for e in common); lo,hi=wilson(k,n)
    tok=sum(R[w][e]['new_tokens'] for e in common); eos=sum(R[w][e]['hit_eos'] for e in common)
    print(f"{w}: {k}/{n} = {100*k/n:.1f} % [{100*lo:.1f}, {100*hi:.1f}] tokens {tok} eos {eos}")
for w in ('q4','int8'):
    d=[int(R[w][e]['scoring']['passed'])-int(R['bf16'][e]['scoring']['passed']) for e in common]
    b=sum(x>0 for x in d); c=sum(x<0 for x in d); m=sum(d)/n
    se=math.sqrt(sum((x-m)**2 for x in d)/(n-1)/n)
    p=binomtest(b,b+c).pvalue if b+c else 1.0; ps[w]=p
    same=sum(R[w][e]['output_sha']==R['bf16'][e]['output_sha'] for e in common)
    print(f"{w} - bf16: {100*m:+.2f} ± {100*se:.2f} points, 95% CI [{100*(m-1.96*se):+.1f}, {100*(m+1.96*se):+.1f}], better {b} worse {c}, McNemar p {p:.3f}, identical outputs {same}/{n}")
s=sorted(ps.items(), key=lambda x:x[1]); 
print('Holm:', {k: min(1, p*(len(s)-i)) for i,(k,p) in enumerate(s)})
